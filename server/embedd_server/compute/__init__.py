"""What an engine takes and gives: the :class:`~embedd_server.compute.engine.Engine` and
``Runtime`` protocols, the ``FloatMatrix`` of vectors, the ``Pack`` of token sequences, and
the settings an engine is loaded with. The core schedules onto these; the engines implement
them; neither imports the other."""
