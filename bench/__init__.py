"""`make bench`: embedd against the engine's in-process ceiling and llama-cpp-python's server.

Not part of the distribution. Run it as ``python -m bench`` from the repository root; see
docs/benchmarks/README.md.
"""
