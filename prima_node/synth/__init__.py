"""Synthetic-model tooling: GGUF files with random weights and a real tokenizer."""
