"""Developer tools of the repository (not shipped): ``python -m tools.<name>``."""
