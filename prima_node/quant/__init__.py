"""GGUF weight quantisation owned by the project.

The synthetic-model tool writes GGUF files that llama.cpp must load and that
should look like real quantised models, so the block formats and the per-tensor
type mixtures follow llama.cpp; the code is ours and needs only numpy.
"""
