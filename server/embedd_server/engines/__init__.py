"""Engines: what computes vectors from token ids. Imports no grpc, no protobuf."""
