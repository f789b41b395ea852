"""The transformer as a ggml graph: the shared blocks every architecture is made of.

One function per block (norm, attention, feed-forward), one per step (``build_step``): a window
of layers, optionally preceded by the embedding lookup and followed by the output projection. The
graph is the same, node for node, as llama.cpp's for these architectures (separate Q/K/V
projections, RoPE on the 3-D heads, K/V written into an F16 cache with ``set_rows``, flash
attention with F32 accumulation, SwiGLU, the last layer computing only the rows whose output is
wanted), which is why its logits equal llama.cpp's on the same file.

Architectures differ only in what ``ArchSpec`` says (RoPE layout, Q/K norms, fused projections,
post-norms, sliding windows, attention sinks, how experts are routed and gated, ...) and the
file's own settings (biases, RoPE scaling, soft-capping); no block branches on an
architecture's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import ggml
from ..arch.config import ModelConfig
from .backend import Compute, get_output, set_input


@dataclass
class LayerTensors:
    """One transformer block's weights as ggml tensors (file-backed, repacked, or copies in a
    GPU's memory)."""

    attn_norm: int
    wo: int
    ffn_norm: int
    w_up: int  # with no w_gate, gate and up fused (Phi-3: the first half is the gate)
    w_down: int
    wq: int | None = None  # separate projections, or one fused wqkv (Phi-3)
    wk: int | None = None
    wv: int | None = None
    wqkv: int | None = None
    w_gate: int | None = None
    bq: int | None = None
    bk: int | None = None
    bv: int | None = None
    bo: int | None = None
    b_up: int | None = None
    b_gate: int | None = None
    b_down: int | None = None
    q_norm: int | None = None
    k_norm: int | None = None
    gate_inp: int | None = None  # a mixture of experts' router (w_gate, w_up, w_down: 3-D)
    gate_inp_b: int | None = None  # biases of the router and of each expert's projections
    up_exps_b: int | None = None  # (gpt-oss: one row per expert)
    gate_exps_b: int | None = None
    down_exps_b: int | None = None
    sinks: int | None = None  # attention sinks: a logit per head (gpt-oss)
    attn_post_norm: int | None = None  # Gemma: norms of the attention's and feed-forward's
    ffn_post_norm: int | None = None  # outputs, before their residual additions
    sliding: bool = False  # the layer attends within the sliding window (Gemma's local layers)


@dataclass
class EndTensors:
    """What the model keeps outside its layers: embedding, final norm, output projection and
    the llama3 RoPE frequency factors, if the file has them."""

    token_embd: int
    output_norm: int
    output: int
    rope_freqs: int | None = None
    output_bias: int | None = None


@dataclass(frozen=True)
class StepShape:
    """What distinguishes one graph from another: cached graphs are keyed on it."""

    n_tokens: int
    n_kv: int  # cache positions attention reads (a multiple of KV_PAD, at most the context)
    embed: bool = False  # input: token ids (True) or hidden states
    logits: bool = False  # output: logits of the last token (True) or hidden states
    last_only: bool = False  # the window's last layer computes the last token's row only


#: Attention reads the cache in blocks of this many positions (llama.cpp pads likewise), so a
#: decode graph serves 256 consecutive positions before another is needed.
KV_PAD = 256


def kv_length(end: int, n_ctx: int) -> int:
    """Cache positions a step ending at position ``end`` (exclusive) attends over."""
    return min(n_ctx, -(-end // KV_PAD) * KV_PAD)


class Builder:
    """A fresh ggml context and graph that blocks add nodes to."""

    def __init__(self, max_nodes: int) -> None:
        self.g = ggml.load()
        g = self.g
        size = g.ggml_tensor_overhead() * max_nodes * 2 + g.ggml_graph_overhead_custom(
            max_nodes, False)
        self.ctx = g.ggml_init(ggml.InitParams(size, None, True))
        if not self.ctx:
            raise MemoryError("ggml could not create a graph context")
        self.graph = g.ggml_new_graph_custom(self.ctx, max_nodes, False)

    def input(self, name: str, dtype: int, *ne: int) -> int:
        g = self.g
        t = (g.ggml_new_tensor_1d(self.ctx, dtype, *ne) if len(ne) == 1
             else g.ggml_new_tensor_2d(self.ctx, dtype, *ne))
        g.ggml_set_name(t, name.encode())
        g.ggml_set_input(t)
        return int(t)

    def expand(self, t: int) -> None:
        self.g.ggml_build_forward_expand(self.graph, t)

    def free(self) -> None:
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = 0


@dataclass
class AttentionInputs:
    pos: int  # I32 [T]: positions, for RoPE
    kv_idx: int  # I64 [T]: cache rows the step's keys and values are written to
    mask: int | None  # F16 [n_kv, T]: 0 where a query may attend, -inf elsewhere (None: no
    n_kv: int  # layer of the step attends without a sliding window)
    cache_rows: int  # positions each cache tensor holds (the context)
    mask_swa: int | None = None  # the same within the sliding window (layers that have one)


def rms_norm(b: Builder, x: int, weight: int, eps: float) -> int:
    g = b.g
    return int(g.ggml_mul(b.ctx, g.ggml_rms_norm(b.ctx, x, eps), weight))


def _rope(b: Builder, cfg: ModelConfig, x: int, pos: int, freqs: int | None,
          sliding: bool = False) -> int:
    """RoPE; a sliding-window layer rotates with its own base and scale (Gemma 3: 10000,
    unscaled); YaRN, where the file names it, on every layer (gpt-oss)."""
    mode = ggml.ROPE_NEOX if cfg.arch.rope_neox else ggml.ROPE_NORMAL
    base, scale = ((cfg.rope_base_swa, cfg.rope_scale_swa) if sliding
                   else (cfg.rope_base, cfg.rope_scale))
    y = cfg.yarn
    ext, attn, fast, slow, orig = ((y.ext_factor, y.attn_factor, y.beta_fast, y.beta_slow,
                                    y.n_ctx_orig) if y is not None
                                   else (0.0, 1.0, 32.0, 1.0, cfg.n_ctx_train))
    return int(b.g.ggml_rope_ext(b.ctx, x, pos, freqs, cfg.n_rot, mode, orig, base, scale,
                                 ext, attn, fast, slow))


def _qkv(b: Builder, cfg: ModelConfig, w: LayerTensors, x: int, T: int
         ) -> tuple[int, int, int]:
    """Queries, keys and values as (head size, heads, tokens): three projections, or views of
    one fused projection's output (Phi-3), as llama.cpp's ``build_qkv``."""
    g, ctx = b.g, b.ctx
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    if w.wqkv is not None:
        qkv = g.ggml_mul_mat(ctx, w.wqkv, x)
        row, f32 = g.tensor(qkv).nb[1], ggml.TYPE_F32

        def view(heads: int, offset: int) -> int:
            return int(g.ggml_view_3d(ctx, qkv, hd, heads, T, g.ggml_row_size(f32, hd), row,
                                      g.ggml_row_size(f32, offset)))

        return view(nh, 0), view(nkv, nh * hd), view(nkv, (nh + nkv) * hd)
    assert w.wq is not None and w.wk is not None and w.wv is not None

    def project(wt: int, bias: int | None, heads: int) -> int:
        y = _biased(b, g.ggml_mul_mat(ctx, wt, x), bias)
        return int(g.ggml_reshape_3d(ctx, y, hd, heads, T))

    return project(w.wq, w.bq, nh), project(w.wk, w.bk, nkv), project(w.wv, w.bv, nkv)


def attention(b: Builder, cfg: ModelConfig, w: LayerTensors, x: int, cache: tuple[int, int],
              inp: AttentionInputs, freqs: int | None) -> int:
    """Self-attention of the step's tokens over the cache, which it first extends."""
    g, ctx = b.g, b.ctx
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    T = g.ggml_nelements(x) // cfg.n_embd

    q, k, v = _qkv(b, cfg, w, x, T)
    if w.q_norm is not None and w.k_norm is not None:
        q = rms_norm(b, q, w.q_norm, cfg.rms_eps)
        k = rms_norm(b, k, w.k_norm, cfg.rms_eps)
    q = _rope(b, cfg, q, inp.pos, freqs, w.sliding)
    k = _rope(b, cfg, k, inp.pos, freqs, w.sliding)
    score_scale = 1.0 / math.sqrt(hd)
    if cfg.arch.query_scale:  # Gemma scales the queries, not the scores (same in exact math)
        q = int(g.ggml_scale(ctx, q, cfg.query_scale))
        score_scale = 1.0
    for t in (q, v, k):  # llama.cpp's order, which keeps the node order (and results) equal
        b.expand(t)
    k_cache, v_cache = cache
    # a token's keys (values) are a row of the cache; in a fused projection's view the rows
    # are as far apart as the fused output's
    b.expand(g.ggml_set_rows(ctx, k_cache, g.ggml_view_2d(ctx, k, cfg.n_embd_kv, T,
                                                          g.tensor(k).nb[2], 0), inp.kv_idx))
    b.expand(g.ggml_set_rows(ctx, v_cache, g.ggml_view_2d(ctx, v, cfg.n_embd_kv, T,
                                                          g.tensor(v).nb[2], 0), inp.kv_idx))

    def cached(c: int) -> int:
        f16 = ggml.TYPE_F16
        view = g.ggml_view_4d(ctx, c, hd, nkv, inp.n_kv, 1, g.ggml_row_size(f16, hd),
                              g.ggml_row_size(f16, cfg.n_embd_kv),
                              g.ggml_row_size(f16, cfg.n_embd_kv * inp.cache_rows), 0)
        return int(g.ggml_permute(ctx, view, 0, 2, 1, 3))

    mask = inp.mask_swa if w.sliding else inp.mask
    assert mask is not None
    out = g.ggml_flash_attn_ext(ctx, g.ggml_permute(ctx, q, 0, 2, 1, 3), cached(k_cache),
                                cached(v_cache), mask, score_scale, 0.0, 0.0)
    if w.sinks is not None:
        g.ggml_flash_attn_ext_add_sinks(out, w.sinks)
    g.ggml_prec_set_acc(out, ggml.PREC_F32)
    out = g.ggml_reshape_2d(ctx, out, hd * nh, T)
    return _biased(b, g.ggml_mul_mat(ctx, w.wo, out), w.bo)


def _biased(b: Builder, y: int, bias: int | None) -> int:
    return int(y if bias is None else b.g.ggml_add(b.ctx, y, bias))


def feed_forward(b: Builder, w: LayerTensors, x: int, gelu: bool = False) -> int:
    """SwiGLU: down(silu(gate(x)) * up(x)); with ``gelu``, GeGLU (Gemma)."""
    g, ctx = b.g, b.ctx
    up = _biased(b, g.ggml_mul_mat(ctx, w.w_up, x), w.b_up)
    if w.w_gate is None:  # gate and up in one projection (Phi-3): SwiGLU of its halves
        return _biased(b, g.ggml_mul_mat(ctx, w.w_down, g.ggml_swiglu(ctx, up)), w.b_down)
    gate = _biased(b, g.ggml_mul_mat(ctx, w.w_gate, x), w.b_gate)
    glu = g.ggml_geglu_split(ctx, gate, up) if gelu else g.ggml_swiglu_split(ctx, gate, up)
    return _biased(b, g.ggml_mul_mat(ctx, w.w_down, glu), w.b_down)


def _routing(b: Builder, cfg: ModelConfig, w: LayerTensors, x: int, T: int
             ) -> tuple[int, int]:
    """The experts each token goes to ([used, T]) and their weights ([1, used, T]), as
    llama.cpp's ``build_moe_ffn``: softmax routing (the top experts by probability, their
    weights normalised to sum to one, the sum clamped to float16's smallest normal, as there)
    or gpt-oss's (the top experts by biased logit, a softmax over those alone)."""
    g, ctx = b.g, b.ctx
    n, used = cfg.n_expert, cfg.n_expert_used
    logits = _biased(b, g.ggml_mul_mat(ctx, w.gate_inp, x), w.gate_inp_b)  # [n_expert, T]
    softmax_weight = cfg.arch.expert_gating == "softmax_weight"
    probs = logits if softmax_weight else g.ggml_soft_max(ctx, logits)
    chosen = g.ggml_argsort_top_k(ctx, probs, used)  # [used, T]
    weights = g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, probs, 1, n, T), chosen)
    if softmax_weight:
        weights = g.ggml_reshape_3d(ctx, g.ggml_soft_max(ctx, g.ggml_reshape_2d(
            ctx, weights, used, T)), 1, used, T)
    else:
        weights = g.ggml_reshape_2d(ctx, weights, used, T)
        total = g.ggml_clamp(ctx, g.ggml_sum_rows(ctx, weights), 6.103515625e-5, math.inf)
        weights = g.ggml_reshape_3d(ctx, g.ggml_div(ctx, weights, total), 1, used, T)
    if cfg.expert_weights_scale not in (0.0, 1.0):
        weights = g.ggml_scale(ctx, weights, cfg.expert_weights_scale)
    b.expand(weights)
    return int(chosen), int(weights)


#: gpt-oss's SwiGLU: x * sigmoid(alpha x) * (up + 1), gate and up clamped to this limit
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def mixture_of_experts(b: Builder, cfg: ModelConfig, w: LayerTensors, x: int) -> int:
    """The routed feed-forward of a mixture of experts, as llama.cpp's ``build_moe_ffn``: each
    token through the gated feed-forward of each expert it is routed to (with the experts'
    biases where the file has them), summed by routing weight."""
    assert w.gate_inp is not None and w.w_gate is not None
    g, ctx = b.g, b.ctx
    T = g.ggml_nelements(x) // cfg.n_embd
    chosen, weights = _routing(b, cfg, w, x, T)

    def experts_product(wt: int, inp: int, bias: int | None) -> int:
        y = g.ggml_mul_mat_id(ctx, wt, inp, chosen)
        return int(y if bias is None else g.ggml_add_id(ctx, y, bias, chosen))

    x3 = g.ggml_reshape_3d(ctx, x, cfg.n_embd, 1, T)
    up = experts_product(w.w_up, x3, w.up_exps_b)  # [n_ff, used, T]
    gate = experts_product(w.w_gate, x3, w.gate_exps_b)
    glu = (g.ggml_swiglu_oai(ctx, gate, up, OAI_ALPHA, OAI_LIMIT)
           if cfg.arch.expert_glu == "swiglu_oai" else g.ggml_swiglu_split(ctx, gate, up))
    experts = experts_product(w.w_down, glu, w.down_exps_b)
    experts = g.ggml_mul(ctx, experts, weights)  # [n_embd, used, T]
    b.expand(experts)
    nb = g.tensor(experts).nb
    views = [int(g.ggml_view_2d(ctx, experts, cfg.n_embd, T, nb[2], i * nb[1]))
             for i in range(cfg.n_expert_used)]
    for v in views:
        b.expand(v)
    out = views[0]
    for v in views[1:]:
        out = int(g.ggml_add(ctx, out, v))
        b.expand(out)
    return int(g.ggml_cont(ctx, out)) if len(views) == 1 else out


def block(b: Builder, cfg: ModelConfig, w: LayerTensors, x: int, cache: tuple[int, int],
          inp: AttentionInputs, freqs: int | None, out_ids: int | None) -> int:
    """One pre-norm transformer block; ``out_ids`` keeps only those rows (the last layer)."""
    g, ctx = b.g, b.ctx
    h = attention(b, cfg, w, rms_norm(b, x, w.attn_norm, cfg.rms_eps), cache, inp, freqs)
    if out_ids is not None:
        h = g.ggml_get_rows(ctx, h, out_ids)
        x = g.ggml_get_rows(ctx, x, out_ids)
    if w.attn_post_norm is not None:
        h = rms_norm(b, h, w.attn_post_norm, cfg.rms_eps)
    h = g.ggml_add(ctx, h, x)
    normed = rms_norm(b, h, w.ffn_norm, cfg.rms_eps)
    y = (mixture_of_experts(b, cfg, w, normed) if w.gate_inp is not None
         else feed_forward(b, w, normed, cfg.arch.gelu))
    if w.ffn_post_norm is not None:
        y = rms_norm(b, y, w.ffn_post_norm, cfg.rms_eps)
    return int(g.ggml_add(ctx, y, h))


@dataclass
class StepGraph:
    """A built graph with its inputs, ready to run any number of times."""

    builder: Builder
    shape: StepShape
    inputs: dict[str, int]
    output: int
    out_shape: tuple[int, int]  # numpy (rows, cols) of the output
    generation: int = -1

    def run(self, compute: Compute, values: dict[str, np.ndarray], *,
            once: bool = False) -> np.ndarray:
        """Set the inputs, compute, read the output. A kept graph is placed in the model's
        persistent buffer on its first run; a graph run ``once`` in a buffer of its own,
        freed before returning."""
        g = self.builder.g
        with compute.lock:
            release = None
            if once:
                release = compute.run_transient(self.builder.graph)
            elif self.generation < 0:
                self.generation = compute.allocate(self.builder.graph)
            try:
                for name, t in self.inputs.items():
                    set_input(g, t, values[name])
                compute.backend.compute(self.builder.graph)
                return get_output(g, self.output, np.empty(self.out_shape, np.float32))
            finally:
                if release is not None:
                    release()

    def free(self) -> None:
        self.builder.free()


def graph_nodes(n_layers: int, n_expert_used: int = 0) -> int:
    """Room for the nodes of a step over ``n_layers`` layers (about 30 each, plus the ends;
    a mixture of experts adds about 30, and two per expert a token uses)."""
    return (48 + (32 + 2 * n_expert_used if n_expert_used else 0)) * n_layers + 64


def build_step(cfg: ModelConfig, shape: StepShape, layers: Sequence[LayerTensors],
               caches: Sequence[tuple[int, int]], cache_rows: int, ends: EndTensors
               ) -> StepGraph:
    """The graph of one step over ``layers`` with their caches, as ``shape`` says."""
    b = Builder(graph_nodes(len(layers), cfg.n_expert_used))
    g = b.g
    T = shape.n_tokens
    inputs: dict[str, int] = {}
    if shape.embed:
        inputs["tokens"] = b.input("tokens", ggml.TYPE_I32, T)
        x = embed(b, cfg, ends, inputs["tokens"])
    else:
        inputs["hidden"] = x = b.input("hidden", ggml.TYPE_F32, cfg.n_embd, T)
    inputs["pos"] = b.input("pos", ggml.TYPE_I32, T)
    inputs["kv_idx"] = b.input("kv_idx", ggml.TYPE_I64, T)
    # only the masks some layer reads: an input outside the graph gets no memory, and ggml
    # aborts on writing to it
    if not all(w.sliding for w in layers):
        inputs["mask"] = b.input("mask", ggml.TYPE_F16, shape.n_kv, T)
    if any(w.sliding for w in layers):
        inputs["mask_swa"] = b.input("mask_swa", ggml.TYPE_F16, shape.n_kv, T)
    out_ids = None
    if shape.last_only:
        inputs["out_ids"] = out_ids = b.input("out_ids", ggml.TYPE_I32, 1)
    att = AttentionInputs(inputs["pos"], inputs["kv_idx"], inputs.get("mask"), shape.n_kv,
                          cache_rows, inputs.get("mask_swa"))
    late = cfg.arch.late_rows
    for i, (w, cache) in enumerate(zip(layers, caches, strict=True)):
        last = i == len(layers) - 1
        x = block(b, cfg, w, x, cache, att, ends.rope_freqs,
                  out_ids if last and not late else None)
    if late and out_ids is not None:  # gpt-oss: the rows wanted are picked after the layers
        x = int(g.ggml_get_rows(b.ctx, x, out_ids))
    rows = 1 if shape.last_only else T
    out_shape = (rows, cfg.n_embd)
    if shape.logits:
        x = output(b, cfg, ends, x)
        out_shape = (rows, cfg.n_vocab)
    g.ggml_set_output(x)
    b.expand(x)
    return StepGraph(b, shape, inputs, x, out_shape)


def embed(b: Builder, cfg: ModelConfig, ends: EndTensors, tokens: int) -> int:
    """The tokens' embedding rows (scaled by sqrt(n_embd) where the architecture says)."""
    x = int(b.g.ggml_get_rows(b.ctx, ends.token_embd, tokens))
    if cfg.arch.embed_scale:
        x = int(b.g.ggml_scale(b.ctx, x, math.sqrt(cfg.n_embd)))
    return x


def output(b: Builder, cfg: ModelConfig, ends: EndTensors, x: int) -> int:
    """Final norm and output projection: logits (soft-capped where the file asks)."""
    g, ctx = b.g, b.ctx
    logits = g.ggml_mul_mat(ctx, ends.output, rms_norm(b, x, ends.output_norm, cfg.rms_eps))
    logits = _biased(b, logits, ends.output_bias)
    if cfg.final_softcap > 0:
        c = cfg.final_softcap
        logits = g.ggml_scale(ctx, g.ggml_tanh(ctx, g.ggml_scale(ctx, logits, 1.0 / c)), c)
    return int(logits)


def build_embed(cfg: ModelConfig, ends: EndTensors, n_tokens: int) -> StepGraph:
    """The embedding lookup alone (the ring's first node embeds before the first window)."""
    b = Builder(8)
    tokens = b.input("tokens", ggml.TYPE_I32, n_tokens)
    x = embed(b, cfg, ends, tokens)
    b.g.ggml_set_output(x)
    b.expand(x)
    return StepGraph(b, StepShape(n_tokens, 0, embed=True), {"tokens": tokens}, x,
                     (n_tokens, cfg.n_embd))


def build_output(cfg: ModelConfig, ends: EndTensors, n_tokens: int) -> StepGraph:
    """The output projection alone (the ring's first node, once the last window is done)."""
    b = Builder(8)
    hidden = b.input("hidden", ggml.TYPE_F32, cfg.n_embd, n_tokens)
    x = output(b, cfg, ends, hidden)
    b.g.ggml_set_output(x)
    b.expand(x)
    return StepGraph(b, StepShape(n_tokens, 0, logits=True), {"hidden": hidden}, x,
                     (n_tokens, cfg.n_vocab))


def step_inputs(shape: StepShape, positions: np.ndarray, n_swa: int = 0
                ) -> dict[str, np.ndarray]:
    """Positions, cache rows, the causal mask and the output row for a step whose tokens sit
    at ``positions`` (consecutive); with ``n_swa``, also the sliding window's mask (a query at
    p sees the positions after p - n_swa, as llama.cpp's standard window)."""
    T = shape.n_tokens
    pos = positions.astype(np.int32)
    mask = np.full((T, shape.n_kv), -np.inf, dtype=np.float16)
    kv = np.arange(shape.n_kv)[None, :]
    visible = kv <= positions[:, None]
    mask[visible] = 0.0
    values: dict[str, np.ndarray] = {"pos": pos, "kv_idx": positions.astype(np.int64),
                                     "mask": mask}
    if n_swa:
        swa = np.full((T, shape.n_kv), -np.inf, dtype=np.float16)
        swa[visible & (positions[:, None] - kv < n_swa)] = 0.0
        values["mask_swa"] = swa
    if shape.last_only:
        values["out_ids"] = np.array([T - 1], dtype=np.int32)
    return values
