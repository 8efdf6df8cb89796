"""The gRPC transport: servicers, the error table, interceptors. Translates; decides nothing."""
