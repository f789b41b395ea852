"""Stop strings over streamed text.

A stop string may arrive split over several tokens ("<|" then "end|>"), so text that could be the
start of one is held back until it is known not to be; it is never streamed and then retracted.
The result does not depend on how the text was split: generation stops at the first stop string
to be *completed* (the one whose end comes first; of two ending together, the longer), and the
text before it is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStrings"]


class StopStrings:
    """Cuts a text stream at the first stop string; feed it each decoded token's text."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            raise ValueError("stops must be a list of strings, not a single string")
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every stop string must be a non-empty string, got {s!r}")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._longest_prefix = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""
        self.hit: str | None = None  # the stop string found, once one was

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit).

        After a hit, the stop string and anything after it are dropped, and so is all later
        input.
        """
        if self.hit is not None:
            return "", True
        buf = self._held + text
        found = self._first_stop(buf)
        if found is not None:
            start, stop = found
            self.hit = stop
            self._held = ""
            return buf[:start], True
        keep = self._held_back(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Release text held back as a possible stop-string start (call at end of generation)."""
        out, self._held = self._held, ""
        return out

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0:
                cand = (i + len(s), -len(s), s)
                if best is None or cand < best:
                    best = cand
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _held_back(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string.

        Only positions holding a stop string's first character are tried, longest suffix first,
        so the work stays small and no table of prefixes is built (a long stop string would
        make one quadratic in its length).
        """
        best = 0
        for s in self.stops:
            i = buf.find(s[0], max(0, len(buf) - (len(s) - 1)))
            while i != -1 and len(buf) - i > best:
                if s.startswith(buf[i:]):
                    best = len(buf) - i
                    break
                i = buf.find(s[0], i + 1)
        return best
