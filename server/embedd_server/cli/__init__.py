"""The ``embedd`` command line."""
