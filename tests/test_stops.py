"""Stop strings over a token stream: every split of the text must give the same result."""

from __future__ import annotations

import itertools

import pytest

from prima_node.text.stops import StopStrings


def stream(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed pieces; return what was emitted per feed, whether a stop hit, and the flushed tail."""
    s = StopStrings(stops)
    out: list[str] = []
    hit = False
    for p in pieces:
        text, hit = s.feed(p)
        out.append(text)
        if hit:
            break
    return out, hit, "" if hit else s.flush()


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Cut before the stop string that is completed first (ties: the longer one)."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0], -best[1])):
            best = (i + len(s), len(s))
    if best is None:
        return text, False
    return text[:best[0] - best[1]], True


def splits(text: str, max_cuts: int = 3) -> list[list[str]]:
    """``text`` cut at every combination of up to ``max_cuts`` positions."""
    out = []
    for k in range(max_cuts + 1):
        for cuts in itertools.combinations(range(1, len(text)), k):
            bounds = [0, *cuts, len(text)]
            out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


CASES = [
    (["</s>"], "Hello world</s> and more"),
    (["</s>"], "no stop here at all <"),
    (["<|im_end|>"], "a<|im<|im_end|>b"),
    (["\n\n", "User:"], "line one\nline two\n\nUser: hi"),
    (["abcd", "bc"], "xxabcdyy"),  # the shorter one completes first
    (["aab"], "aaab"),  # a false start overlapping the real one
    (["ab", "b"], "cab"),  # ends together: the longer one
    (["stop", "top", "op"], "s-to-stop"),
    (["ü→", "→x"], "aü→x"),  # non-ASCII characters
]


@pytest.mark.parametrize("stops,text", CASES)
def test_every_split_gives_the_same_result(stops: list[str], text: str) -> None:
    want, want_hit = reference(stops, text)
    for pieces in splits(text):
        out, hit, tail = stream(stops, pieces)
        assert hit == want_hit, pieces
        assert "".join(out) + tail == want, pieces


@pytest.mark.parametrize("stops,text", CASES)
def test_nothing_is_streamed_that_a_stop_string_later_swallows(
        stops: list[str], text: str) -> None:
    want, _ = reference(stops, text)
    for pieces in splits(text, 2):
        out, _, _ = stream(stops, pieces)
        emitted = ""
        for chunk in out:
            emitted += chunk
            assert want.startswith(emitted), (pieces, emitted)


def test_a_partial_stop_is_held_back_and_released_by_flush() -> None:
    s = StopStrings(["<|end|>"])
    assert s.feed("Hello <|en") == ("Hello ", False)
    assert s.feed("") == ("", False)
    assert s.flush() == "<|en"
    assert s.flush() == ""


def test_a_false_start_is_released_as_soon_as_it_diverges() -> None:
    s = StopStrings(["<|end|>"])
    assert s.feed("a <|") == ("a ", False)
    assert s.feed("e") == ("", False)
    assert s.feed("x") == ("<|ex", False)


def test_the_stop_string_and_everything_after_it_are_dropped() -> None:
    s = StopStrings(["END"])
    assert s.feed("doneEND trailing") == ("done", True)
    assert s.hit == "END"
    assert s.feed("more") == ("", True)
    assert s.flush() == ""


def test_no_stops_passes_everything_through() -> None:
    s = StopStrings([])
    assert s.feed("abc") == ("abc", False)
    assert s.flush() == ""


@pytest.mark.parametrize("bad", [[""], ["ok", ""], "stop", [None]])
def test_bad_stop_lists_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        StopStrings(bad)  # type: ignore[arg-type]
