"""Readers for checkpoint formats other than a Hugging Face folder (GGUF, ...)."""
