"""The core: requests, models, scheduling and workers. Imports no grpc, no protobuf."""
