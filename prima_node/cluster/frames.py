"""Activation frames: hidden states crossing a ring hop as one binary websocket message.

A frame is a fixed little-endian header, the session name, the compute times of the windows the
token has visited so far this step (so the head learns every node's per-token time without a
message of its own), then the hidden states. Everything is checked on receipt: a frame that is
not exactly what its header says is refused with the reason, and the link that sent it is
closed; nothing is ever guessed from a malformed frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"PRMA"
VERSION = 2
KIND_ACTIVATIONS = 1
DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
DTYPE_CODES = {"f32": 0, "f16": 1}
MAX_SESSION = 128
MAX_MARKS = 1024
#: flags: more micro-batches of this frame's round follow in the same forward pass (a node
#: keeps the round's window until the last one, rather than release and read it again)
FLAG_MORE = 1
# magic, version, kind, dtype, flags, plan epoch, step, round, n_rounds, pos0, n_tokens, n_embd,
# session length, marks
_HEADER = struct.Struct("<4sBBBBIIHHIIIHH")


class FrameError(ValueError):
    """A frame that does not follow the format; the message says what is wrong."""


@dataclass
class Frame:
    session: str
    epoch: int  # which plan the frame belongs to: a node holding another plan refuses it
    step: int  # the head's forward-call counter: answers must match the question
    round: int  # which round of k the states are in
    n_rounds: int
    pos0: int  # positions pos0 .. pos0 + n_tokens - 1
    hidden: np.ndarray  # (n_tokens, n_embd) float32 after decoding
    marks: list[tuple[int, int]] = field(default_factory=list)  # (node index, compute µs)
    more: bool = False  # FLAG_MORE: another micro-batch of this round follows

    @property
    def n_tokens(self) -> int:
        return int(self.hidden.shape[0])


def max_frame_bytes(n_embd: int, max_tokens: int) -> int:
    """The largest frame a model of width ``n_embd`` ever sends (prefill chunks of at most
    ``max_tokens``, float32): what a ring socket needs to accept, and no more, so that a peer
    cannot make a node buffer hundreds of megabytes before it has proved anything."""
    return _HEADER.size + MAX_SESSION + 8 * MAX_MARKS + max_tokens * n_embd * 4


def encode(frame: Frame, dtype: str = "f32") -> bytes:
    code = DTYPE_CODES[dtype]
    h = np.ascontiguousarray(frame.hidden, dtype=DTYPES[code])
    if h.ndim != 2:
        raise ValueError("hidden states must be (tokens, n_embd)")
    name = frame.session.encode("utf-8")
    if len(name) > MAX_SESSION:
        raise ValueError(f"session names are at most {MAX_SESSION} bytes")
    if len(frame.marks) > MAX_MARKS:
        raise ValueError("too many timing marks")
    head = _HEADER.pack(MAGIC, VERSION, KIND_ACTIVATIONS, code,
                        FLAG_MORE if frame.more else 0, frame.epoch, frame.step,
                        frame.round, frame.n_rounds, frame.pos0, h.shape[0], h.shape[1], len(name),
                        len(frame.marks))
    marks = struct.pack(f"<{2 * len(frame.marks)}I", *(v for m in frame.marks for v in m))
    return head + name + marks + h.tobytes()


def decode(data: bytes, n_embd: int) -> Frame:
    """The frame in ``data``, checked against the model's width; FrameError if malformed."""
    if len(data) < _HEADER.size:
        raise FrameError(f"a frame of {len(data)} bytes is shorter than the header")
    (magic, version, kind, code, flags, epoch, step, rnd, n_rounds, pos0, n_tokens, width,
     n_name, n_marks) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"not an activation frame (magic {magic!r})")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not {VERSION} (nodes of different "
                         "versions: update them together)")
    if kind != KIND_ACTIVATIONS:
        raise FrameError(f"unknown frame kind {kind}")
    dtype = DTYPES.get(code)
    if dtype is None:
        raise FrameError(f"unknown dtype code {code}")
    if flags & ~FLAG_MORE:
        raise FrameError(f"unknown flags {flags:#x}")
    if width != n_embd:
        raise FrameError(f"hidden states {width} wide, the model's are {n_embd}")
    if n_tokens < 1 or n_rounds < 1 or rnd >= n_rounds:
        raise FrameError(f"impossible header: {n_tokens} tokens, round {rnd} of {n_rounds}")
    if n_name > MAX_SESSION or n_marks > MAX_MARKS:
        raise FrameError("session name or timing marks too long")
    at = _HEADER.size
    expected = at + n_name + 8 * n_marks + n_tokens * width * dtype.itemsize
    if len(data) != expected:
        raise FrameError(f"the frame has {len(data)} bytes, its header says {expected}")
    try:
        session = data[at:at + n_name].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("the session name is not UTF-8") from None
    at += n_name
    flat = struct.unpack_from(f"<{2 * n_marks}I", data, at)
    at += 8 * n_marks
    hidden = np.frombuffer(data, dtype=dtype, count=n_tokens * width, offset=at)
    hidden = hidden.reshape(n_tokens, width).astype(np.float32)
    if not np.isfinite(hidden).all():
        raise FrameError("the hidden states hold NaN or infinity")
    return Frame(session, epoch, step, rnd, n_rounds, pos0, hidden,
                 [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)],
                 bool(flags & FLAG_MORE))
