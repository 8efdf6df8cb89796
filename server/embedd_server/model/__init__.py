"""What a model file says: the catalogue's facts read from a GGUF's metadata (family, task,
pooling, prompts, dense and sparse heads). The core and the engines both read them; neither
imports the other."""
