"""A GGUF file opened for inference: validated metadata and memory-mapped tensors.

The weights are never copied: every tensor is a numpy view into one read-only ``np.memmap`` of
the file, so the page cache, not the process, holds them (a node can run a model larger than its
RAM, and the prefetcher works on the same pages). Everything a later step relies on (magic,
version, tensor types, offsets inside the file) is checked here, once, so that a bad file fails
at open with one message naming the file and the key or tensor at fault.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import ModelLoadError
from .quant_types import SUPPORTED_NAMES, SUPPORTED_TYPES, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file.

    ``shape`` is in numpy order (rows, cols), the reverse of GGUF's dimension order. ``data`` is
    the memory-mapped view: float32 / float16 arrays of ``shape`` for F32 / F16, and a uint8 array
    (rows, bytes per row) for BF16 and every block-quantised type.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int
    data: np.ndarray

    @property
    def byte_range(self) -> tuple[int, int]:
        """[start, end) of the tensor's bytes in the file, for prefetching and releasing."""
        return self.offset, self.offset + self.n_bytes


class _DefectError(Exception):
    """A defect found while parsing; turned into a ModelLoadError naming the file."""


#: Metadata arrays longer than this stay one view of the map, decoded only when asked for.
LAZY_ARRAY = 1024


class _CheckedReader(GGUFReader):
    """gguf's reader, made to fail with a clear reason on truncated or inconsistent files, and
    to keep large metadata arrays (vocabularies, merges) in the file instead of the heap.

    The stock reader silently slices past the end of the map and then fails later with an
    unrelated numpy error; here every read is bounds-checked and tensor records are validated
    before they are turned into views. It also builds one numpy object per array element: a
    Llama 3 vocabulary (128k tokens, 280k merges) then costs 600 MB of heap, more than some
    devices can spare, so long arrays are kept as a single view instead (see ``lazy_array``).
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        itype = int(self._get(orig_offs, np.uint32)[0])
        count = int(self._get(orig_offs + 4, np.uint64)[0])
        if count <= LAZY_ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        start = orig_offs + 12
        if itype == GGUFValueType.STRING:
            end = _skip_strings(self.data, start, count)
        else:
            nptype = self.gguf_scalar_to_np.get(GGUFValueType(itype))
            if nptype is None:
                raise _DefectError(f"metadata array of type {itype} is not supported")
            end = start + count * np.dtype(nptype).itemsize
            self._get(start, np.uint8, end - start)  # bounds check
        parts = [np.array([itype], np.uint32), np.array([count], np.uint64),
                 self.data[start:end]]
        return end - orig_offs, parts, [2], [GGUFValueType.ARRAY, GGUFValueType(itype)]

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
        itemsize = np.dtype(dtype).itemsize
        end = int(offset) + itemsize * int(count)
        if end > len(self.data):
            raise _DefectError(
                f"the file ends at byte {len(self.data)} but its header needs bytes up to {end}: "
                "the file is truncated (an incomplete download or copy?)"
            )
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        size = len(self.data)
        for field in fields:
            _len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            code = int(raw_dtype[0])
            try:
                qtype = GGMLQuantizationType(code)
            except ValueError:
                raise _DefectError(
                    f"tensor {name!r} has type {type_name(code)}, which this engine cannot run; "
                    f"supported types: {SUPPORTED_NAMES}"
                ) from None
            if qtype not in SUPPORTED_TYPES:
                raise _DefectError(
                    f"tensor {name!r} has type {qtype.name}, which this engine cannot run; "
                    f"supported types: {SUPPORTED_NAMES}")
            if not 1 <= len(dims) <= 4 or any(int(d) == 0 for d in dims):
                raise _DefectError(
                    f"tensor {name!r} has dimensions {[int(d) for d in dims]}: a tensor needs "
                    "one to four dimensions, none of them zero; the file is corrupt")
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(dims.astype(np.uint64)))
            if len(dims) and int(dims[0]) % block:
                raise _DefectError(
                    f"tensor {name!r} has rows of {int(dims[0])} values, not a multiple of "
                    f"the {qtype.name} block size {block}: the file is corrupt"
                )
            start = start_offs + int(offset_tensor[0])
            end = start + n_elems // block * type_size
            if start % self.alignment:
                raise _DefectError(
                    f"tensor {name!r} starts at byte {start}, which is not aligned to "
                    f"{self.alignment}: the file is corrupt"
                )
            if end > size:
                raise _DefectError(
                    f"tensor {name!r} needs bytes {start}..{end} but the file ends at byte "
                    f"{size}: the file is truncated (an incomplete download or copy?)"
                )
        super()._build_tensors(start_offs, fields)


class ModelFile:
    """Metadata and tensors of one GGUF file, memory-mapped read-only."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.size = len(reader.data)
        self._reader: GGUFReader | None = reader
        self._values: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            self.tensors[t.name] = TensorInfo(
                name=t.name,
                qtype=t.tensor_type,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
                data=t.data,
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelFile:
        """Open and validate a GGUF file; raises ModelLoadError with the reason if unusable."""
        p = Path(path)
        _check_header(p)
        try:
            reader = _CheckedReader(p, "r")
        except _DefectError as exc:
            raise ModelLoadError(p, str(exc)) from None
        except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as exc:
            raise ModelLoadError(p, f"the GGUF metadata is corrupt ({exc})") from None
        mf = cls(p, reader)
        try:
            _check_layout(mf)
        except BaseException:
            mf.close()
            raise
        return mf

    # -- metadata -----------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return self._require_reader().get_field(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (arrays as lists), or ``default`` when absent."""
        if key in self._values:
            return self._values[key]
        field = self._require_reader().get_field(key)
        if field is None:
            return default
        value = lazy_array(field) if _is_lazy(field) else field.contents()
        self._values[key] = value
        return value

    def require(self, key: str) -> Any:
        """The value of a key the model cannot work without."""
        value = self.get(key)
        if value is None:
            raise ModelLoadError(self.path, f"required metadata key {key!r} is missing")
        return value

    def array_length(self, key: str) -> int | None:
        """Length of an array-valued key without decoding it (vocabularies are large)."""
        field = self._require_reader().get_field(key)
        if field is None:
            return None
        return int(field.parts[4][0]) if _is_lazy(field) else len(field.data)

    def keys(self) -> Iterator[str]:
        return iter(self._require_reader().fields.keys())

    # -- tensors ------------------------------------------------------------------------------

    @property
    def mapping(self) -> np.ndarray:
        """The whole file's read-only map (uint8), which every tensor view is part of."""
        return self._require_reader().data

    def tensor(self, name: str) -> TensorInfo:
        """A tensor the architecture requires; a missing one is a load error naming it."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(self.path, f"required tensor {name!r} is missing")
        return t

    def close(self) -> None:
        """Drop the map. Views handed out keep their pages alive until they are released."""
        reader, self._reader = self._reader, None
        if reader is not None:
            mm = reader.data
            del reader
            self.tensors = {}
            base = getattr(mm, "_mmap", None)
            del mm
            if base is not None:
                # still referenced by live views: the OS unmaps when they go
                with contextlib.suppress(BufferError):
                    base.close()

    def _require_reader(self) -> GGUFReader:
        if self._reader is None:
            raise ValueError(f"{self.path} is closed")
        return self._reader


def _check_layout(mf: ModelFile) -> None:
    """No two tensors may share bytes: a tensor running into the next is a size the header
    got wrong, and ggml would read the neighbour's bytes as its own."""
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in mf.tensors.values())
    for (_a, end, name), (start, _b, nxt) in itertools.pairwise(spans):
        if start < end:
            raise ModelLoadError(mf.path, f"tensors {name!r} and {nxt!r} overlap in the file "
                                          f"(bytes {start}..{end}): the file is corrupt")


def _skip_strings(data: np.ndarray, start: int, count: int) -> int:
    """End offset of ``count`` length-prefixed strings starting at ``start`` (bounds-checked)."""
    mv = data.data  # the buffer itself: struct reads without copying
    size = len(mv)
    off = start
    for _ in range(count):
        if off + 8 > size:
            raise _DefectError("the file is truncated inside a metadata string array")
        (n,) = struct.unpack_from("<Q", mv, off)
        off += 8 + n
    if off > size:
        raise _DefectError("the file is truncated inside a metadata string array")
    return off


def _is_lazy(field: Any) -> bool:
    # a key's field is [key length, key, value type] + the parts from _get_field_parts
    return bool(field.types and field.types[0] == GGUFValueType.ARRAY and len(field.parts) == 6
                and int(field.parts[4][0]) > LAZY_ARRAY)


def lazy_array(field: Any) -> list[Any]:
    """Decode a long metadata array kept as one view by the reader."""
    itype = GGUFValueType(int(field.parts[3][0]))
    count = int(field.parts[4][0])
    region = field.parts[5]
    if itype != GGUFValueType.STRING:
        return list(region.view(GGUFReader.gguf_scalar_to_np[itype]).tolist())
    raw = region.tobytes()
    out = []
    off = 0
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, off)
        out.append(raw[off + 8: off + 8 + n].decode("utf-8", errors="replace"))
        off += 8 + n
    return out


def _check_header(path: Path) -> None:
    """Reject files that are not GGUF, or of a version we do not read, with a clear message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except IsADirectoryError:
        raise ModelLoadError(path, "is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ModelLoadError(path, f"cannot be read ({exc.strerror})") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            path,
            f"not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r}); "
            "convert the model to GGUF with llama.cpp's convert_hf_to_gguf.py",
        )
    if len(head) < 24:
        raise ModelLoadError(path, "the file is truncated inside the GGUF header")
    (version,) = struct.unpack_from("<I", head, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            path,
            f"GGUF version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
        )
