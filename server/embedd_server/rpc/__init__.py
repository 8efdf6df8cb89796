"""The gRPC transport: one handler module per API, the error table, interceptors. Translates;
decides nothing."""
