"""Converting Hugging Face model directories to GGUF (no torch, no network)."""
