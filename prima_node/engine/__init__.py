"""The executor: embedding, windows of transformer layers with their KV caches, output head."""
