"""The text layer: tokenizers read from GGUF metadata, chat templates, tool-call parsing, sampling.

Everything here works on token ids and strings; the engine (``prima_node.engine``) never sees text.
"""
