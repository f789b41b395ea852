"""Model profiles: what the planner believes a model costs must be what the file really holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prima_node.arch.spec import ARCHITECTURES
from prima_node.model_file import ModelFile
from prima_node.planner.model_profile import (
    PUBLISHED,
    ModelProfile,
    PublishedModel,
    from_gguf,
    from_published,
    from_shapes,
)
from prima_node.synth.presets import PRESETS, Preset, with_experts
from prima_node.synth.writer import tensor_plan
from tests.conftest import ModelFactory

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"

#: Sizes of files as published on Hugging Face (bartowski / Qwen), in bytes / 1e9; the file
#: adds its metadata and vocabulary (a few MB) to the weights.
PUBLISHED_FILE_GB = {("llama3-8b", "Q4_K_M"): 4.92, ("llama3-70b", "Q4_K_M"): 42.52,
                     ("qwen2.5-32b", "Q4_K_M"): 19.85, ("qwen2.5-72b", "Q4_K_M"): 47.42,
                     # bartowski's Qwen3-30B-A3B files (a mixture of experts: every expert is
                     # held, 8 of 128 read per token)
                     ("qwen3-30b-a3b", "Q8_0"): 32.48, ("qwen3-30b-a3b", "Q6_K"): 25.10,
                     ("qwen3-30b-a3b", "Q5_K_M"): 21.74}


@pytest.mark.parametrize(("arch", "preset", "quant"), [
    ("llama", "small", "Q4_K_M"), ("qwen2", "small", "Q8_0"), ("qwen3", "tiny", "Q6_K"),
    ("llama", "tiny", "F16"), ("qwen3moe", "small", "Q4_K_M"),
])
def test_a_files_profile_is_its_tensor_table(make_model: ModelFactory, arch: str, preset: str,
                                             quant: str) -> None:
    path = make_model(arch, preset, quant)
    profile = from_gguf(path)
    mf = ModelFile.open(path)
    try:
        tensors = list(mf.tensors.values())
        in_layers = sum(t.n_bytes for t in tensors if t.name.startswith("blk."))
        assert sum(layer.bytes for layer in profile.layers) == in_layers
        emb = mf.tensor("token_embd.weight")
        assert profile.embedding_bytes == emb.n_bytes
        assert profile.file_bytes == path.stat().st_size
    finally:
        mf.close()
    p = PRESETS[preset]
    if ARCHITECTURES[arch].moe:
        p = with_experts(p, preset)
    assert (profile.n_layer, profile.n_embd, profile.n_vocab) == (p.n_layer, p.n_embd, p.n_vocab)
    # the same shapes computed without the file give the same layers (the published path)
    shapes = PublishedModel("x", arch, p.n_layer, p.n_embd, p.n_head, p.n_head_kv, p.n_ff,
                            p.n_vocab, p.n_ctx_train, tied=p.tied,
                            experts=(p.n_expert, p.n_expert_used, p.n_ff_exp))
    computed = from_shapes(shapes, quant)
    assert computed.layers == profile.layers
    assert computed.output_bytes == profile.output_bytes


def test_flops_count_every_matmul_twice_per_weight(make_model: ModelFactory) -> None:
    profile = from_gguf(make_model("llama", "tiny", "F16"))
    p = PRESETS["tiny"]
    hd = p.n_embd // p.n_head
    weights = (p.n_embd * p.n_head * hd * 2 + 2 * p.n_embd * p.n_head_kv * hd
               + 3 * p.n_embd * p.n_ff)
    assert sum(profile.layers[0].flops_by_type.values()) == 2 * weights
    assert profile.kv_bytes_per_layer(100) == 2 * p.n_head_kv * hd * 100 * 2
    assert profile.activation_bytes() == 4 * p.n_embd


@pytest.mark.parametrize(("name", "quant"), sorted(PUBLISHED_FILE_GB))
def test_published_profiles_match_the_published_file_sizes(name: str, quant: str) -> None:
    weights = from_published(name, quant).to_json()["summary"]["weights_bytes"]
    published = PUBLISHED_FILE_GB[name, quant] * 1e9
    assert published - 0.03e9 < weights <= published + 0.005e9, weights / 1e9


#: llama-bench's figures for the files people run (its "size" is the tensors' bytes in GiB,
#: "params" their count in billions, both to two decimals), as reported in llama.cpp issues:
#: ggml-org's MXFP4 MoE GGUFs of gpt-oss, the Q4_K_M files of the others
LLAMA_BENCH_SIZES = {"gpt-oss-20b": (11.27, 20.91), "gpt-oss-120b": (59.02, 116.83),
                     "qwen3-30b-a3b": (17.28, 30.53), "qwen3-32b": (18.40, 32.76),
                     "llama3.3-70b": (39.59, 70.55), "gemma3-27b": (15.40, 27.01)}


@pytest.mark.parametrize("name", sorted(LLAMA_BENCH_SIZES))
def test_published_profiles_match_llama_bench_s_size_and_parameters(name: str) -> None:
    """Size and count both to llama-bench's two decimals: a tensor missing, of another shape
    or of another type in the quantiser's mixture would not be (gpt-oss: MXFP4 experts,
    everything else Q8_0, biases, sinks and norms F32)."""
    m = PUBLISHED[name]
    profile = from_published(name)
    assert profile.quant == m.ftype
    gib, billions = LLAMA_BENCH_SIZES[name]
    assert round(profile.to_json()["summary"]["weights_bytes"] / 2**30, 2) == gib
    n, used, width = m.experts
    preset = Preset(n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, n_head_kv=m.n_head_kv,
                    n_ff=m.n_ff, n_vocab=m.n_vocab, tied=m.tied, n_expert=n,
                    n_expert_used=used, n_ff_exp=width, head_dim=m.head_dim)
    params = sum(math.prod(t.shape) for t in tensor_plan(m.arch, preset, m.n_vocab))
    assert round(params / 1e9, 2) == billions


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_example_profiles_are_what_the_code_computes(name: str) -> None:
    shipped = json.loads((EXAMPLES / PUBLISHED[name].example_name).read_text())
    assert shipped == json.loads(json.dumps(from_published(name).to_json()))
    assert ModelProfile.from_json(shipped) == from_published(name)


def test_a_profile_loads_from_json_or_gguf_and_refuses_garbage(make_model: ModelFactory,
                                                               tmp_path: Path) -> None:
    path = make_model()
    doc = from_gguf(path).to_json()
    j = tmp_path / "m.json"
    j.write_text(json.dumps(doc))
    assert ModelProfile.load(j) == ModelProfile.load(path)
    for bad, words in [({"format": "other"}, "not a model profile"),
                       ({**doc, "layers": doc["layers"][:1]}, "lists 1 layers"),
                       ({k: v for k, v in doc.items() if k != "n_embd"}, "incomplete")]:
        j.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            ModelProfile.load(j)
    with pytest.raises(ValueError, match="unknown published model"):
        from_published("llama9-1t")


def test_the_cli_prints_a_summary_and_the_exchange_format(make_model: ModelFactory) -> None:
    cmd = [sys.executable, "-m", "prima_node.cli", "model-profile"]
    out = subprocess.run([*cmd, "--published", "llama3-70b"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "80 layers" in out and "42.51 GB" in out
    doc = json.loads(subprocess.run([*cmd, str(make_model()), "--json"], capture_output=True,
                                    text=True, timeout=60, check=True).stdout)
    assert ModelProfile.from_json(doc) == from_gguf(make_model())
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--published" in res.stderr


SCRATCH_SCRIPT = r"""
import json, sys
import numpy as np
from prima_node.engine.model import DEFAULT_BATCH, Model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

model = Model.open(sys.argv[1], threads=1, n_ctx=DEFAULT_BATCH, repack=False)
window = model.window(0, model.config.n_layer)
h = np.random.default_rng(0).standard_normal((DEFAULT_BATCH, model.config.n_embd))
h = h.astype(np.float32)
window.forward(h[:4], np.arange(4), "warm")  # first calls, every weight page read once
window.drop("warm")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak RSS starts again from here
before = status("VmRSS")
window.forward(h, np.arange(DEFAULT_BATCH), "s")
peak = status("VmHWM")  # the chunk's buffers are freed after it: its peak is what counts
c = model.config
kv = 2 * c.n_layer * c.n_embd_kv * DEFAULT_BATCH * 2  # float16 K and V of the chunk's rows
print(json.dumps({"chunk": peak - before - kv}))
"""


@pytest.mark.parametrize(("preset", "layers"), [("small", None), ("1b", 2)])
def test_the_scratch_figure_covers_what_the_engine_allocates_for_a_prefill_chunk(
        make_model: ModelFactory, preset: str, layers: int | None) -> None:
    """Halda reserves ``scratch_bytes`` on every node instead of a fixed 300 MiB: it must hold
    what a 256-token chunk really adds to the process's memory at its peak (ggml's compute and
    work buffers, numpy's arrays: measured in a fresh interpreter, less the cache rows the
    chunk writes), and not be wildly above it either, or memory-poor nodes get fewer layers
    than they can hold."""
    from prima_node.engine.model import DEFAULT_BATCH
    from prima_node.planner.halda import Options

    assert Options().batch == DEFAULT_BATCH
    path = make_model("llama", preset, "Q8_0", seed=3, layers=layers)
    run = subprocess.run([sys.executable, "-c", SCRATCH_SCRIPT, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    chunk = json.loads(run.stdout)["chunk"]
    figure = ModelProfile.load(path).scratch_bytes(DEFAULT_BATCH, DEFAULT_BATCH)
    assert chunk <= figure <= 2 * chunk, (chunk, figure)


def test_a_mixture_of_experts_holds_every_expert_and_a_token_reads_its_own(
        make_model: ModelFactory) -> None:
    """Memory is priced by what a layer holds, compute and bandwidth by what a token reads:
    attention, the router and ``used`` of the ``n`` experts."""
    profile = from_gguf(make_model("qwen3moe", "small", "F16"))
    p = with_experts(PRESETS["small"], "small")
    e, hd = p.n_embd, p.head_size
    attention = 2 * e * p.n_head * hd + 2 * e * p.n_head_kv * hd
    router = p.n_expert * e
    expert = 3 * e * p.n_ff_exp
    layer = profile.layers[0]
    norms = 4 * (2 * e + 2 * hd)  # float32: two block norms, the q and k norms
    assert layer.bytes == 2 * (attention + p.n_expert * expert) + 4 * router + norms
    assert layer.touched_bytes == 2 * (attention + p.n_expert_used * expert) + 4 * router + norms
    assert sum(layer.flops_by_type.values()) == 2 * (attention + router
                                                     + p.n_expert_used * expert)
    assert profile.mean_touched_layer_bytes < profile.mean_layer_bytes / 3
    dense = from_gguf(make_model("qwen3", "small", "F16")).layers[0]
    assert dense.touched_bytes == dense.bytes and dense.touched_bytes_by_type is None


def test_the_published_gemma3_shapes_give_the_real_file_s_profile() -> None:
    """Gemma 3's 640-wide rows take llama.cpp's fallback types (Q5_0 for Q4_K, Q8_0 for
    Q6_K): computed from the published shapes, every layer equals the real file's."""
    from prima_node.packaged_models import gemma3_270m

    real = from_gguf(gemma3_270m())
    computed = from_published("gemma3-270m")
    assert computed.layers == real.layers
    assert (computed.embedding_bytes, computed.output_bytes) == (real.embedding_bytes,
                                                                 real.output_bytes)
    assert {"Q5_0", "Q8_0"} <= set(real.layers[0].bytes_by_type)
