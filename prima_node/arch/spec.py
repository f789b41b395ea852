"""What distinguishes the supported architectures from one another."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """The few facts the shared transformer block needs about an architecture.

    ``rope_neox``: rotate the two halves of each head (GPT-NeoX layout, Qwen) instead of adjacent
    pairs (llama.cpp's converter permutes Llama's q/k weights into the adjacent-pair layout).
    ``qkv_bias``: its files carry biases on the attention projections (Qwen2): the synthetic
    model tool writes them and the planner counts them; the engine, like llama.cpp, adds any
    projection bias a file has, whatever the architecture. ``qk_norm``: per-head RMSNorm of
    queries and keys before RoPE (Qwen3). ``optional``: the tensors a file of this architecture
    may carry beyond the required ones (as llama.cpp's loader for it accepts them; any other
    tensor is refused): biases of the attention's projections (``bq``, ``bk``, ``bv``, ``bo``)
    and of the feed-forward's (``b_up``, ``b_gate``, ``b_down``), of the output
    (``output_bias``), llama3's RoPE factors (``rope_freqs``). ``moe``: the feed-forward is
    a mixture of experts (a router, ``n_expert`` SwiGLU experts in 3-D tensors, the top
    ``n_expert_used`` of them per token, their weights normalised to sum to one, as llama.cpp's
    ``build_moe_ffn`` does for Qwen3-MoE).

    Gemma's differences, each a field: ``embed_scale`` (token embeddings scaled by
    sqrt(n_embd)), ``post_norms`` (an RMSNorm after attention and after the feed-forward, before
    each residual addition), ``gelu`` (a GELU-gated feed-forward instead of SwiGLU),
    ``swa_pattern`` (sliding-window attention on every layer but each ``swa_pattern``-th, with
    its own RoPE base, when the file names a window), ``query_scale`` (queries scaled by
    1/sqrt(head size) before attention rather than the scores after).

    Phi-3's: ``fused_qkv`` (one ``attn_qkv`` projection whose output holds the queries, keys
    and values), ``fused_up`` (one ``ffn_up`` of twice the width whose first half is the gate).

    gpt-oss's, as llama.cpp's ``openai-moe`` graph: ``sinks`` (a learned logit per head that
    takes a share of every query's attention and gives nothing back), ``expert_gating``
    (``"softmax_weight"``: the top experts by raw router logit, their weights a softmax over
    those alone, not normalised again), ``expert_glu`` (``"swiglu_oai"``: OpenAI's clamped
    SwiGLU, x * sigmoid(1.702 x) * (up + 1)), ``expert_bias`` (biases on the router and on each
    expert's projections), ``ffn_norm`` (the pre-feed-forward norm's tensor name:
    ``post_attention_norm`` there) and ``late_rows`` (the last layer computes every row; the
    rows wanted are picked after it, before the output norm).
    """

    name: str
    rope_neox: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    optional: frozenset[str] = frozenset({"bq", "bk", "bv"})
    moe: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    gelu: bool = False
    swa_pattern: int = 0
    query_scale: bool = False
    fused_qkv: bool = False
    fused_up: bool = False
    sinks: bool = False
    expert_gating: str = "softmax"
    expert_glu: str = "swiglu"
    expert_bias: bool = False
    ffn_norm: str = "ffn_norm"
    late_rows: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llama", rope_neox=False,  # Llama 2/3/3.1/3.2, Mistral dense
                 optional=frozenset({"bq", "bk", "bv", "bo", "b_up", "b_gate", "b_down",
                                     "rope_freqs"})),
        ArchSpec("qwen2", rope_neox=True, qkv_bias=True,
                 optional=frozenset({"bq", "bk", "bv", "output_bias"})),
        ArchSpec("qwen3", rope_neox=True, qk_norm=True),
        ArchSpec("qwen3moe", rope_neox=True, qk_norm=True, moe=True),  # Qwen3-30B-A3B, 235B
        ArchSpec("gemma3", rope_neox=True, qk_norm=True, optional=frozenset(),  # 270M to 27B
                 embed_scale=True, post_norms=True, gelu=True, swa_pattern=6,
                 query_scale=True),
        ArchSpec("phi3", rope_neox=True, optional=frozenset(), query_scale=True,  # Phi-3, 3.5, 4
                 fused_qkv=True, fused_up=True),
        ArchSpec("gpt-oss", rope_neox=True, qkv_bias=True, moe=True, swa_pattern=2,  # 20b, 120b
                 optional=frozenset({"bq", "bk", "bv", "bo"}), sinks=True,
                 expert_gating="softmax_weight", expert_glu="swiglu_oai", expert_bias=True,
                 ffn_norm="post_attention_norm", late_rows=True),
    )
}
