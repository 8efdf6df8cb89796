"""Cross-cutting gRPC concerns: API keys and rate limits, the access log, the decode guard."""
