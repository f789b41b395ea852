"""GGUF tensors as ggml tensors, placed at their offsets inside the file's mapping.

Nothing is copied: each ggml tensor's data pointer is the address of its bytes in the read-only
map, so the page cache holds the weights and prefetch / release / ``mincore`` act on what ggml
reads. The tensor descriptions themselves (a few hundred bytes each) live in a small ggml
context per owner (a window, or the model's ends), freed with it.

Optionally (``repack``), the matrices ggml can multiply faster in an interleaved layout (Q4_0,
Q4_K, Q5_K, Q6_K, Q2_K, IQ4_NL and others, depending on the CPU) get a repacked copy in anonymous
memory, as llama.cpp does by default: 10-25 % faster decoding, at the price of holding those
weights outside the page cache. Only for weights a device keeps resident: a repacked copy
cannot be prefetched or released, so a window streamed from disk never asks for it.

GPU layers (``copy_to``, a device's buffer type) are the exception: their bytes are copied once
into the device's memory, where ggml's GPU kernels read them, except on a GPU that shares the
host's memory and can wrap it (Metal: ``map_on``, the device), which reads the mapping itself,
as llama.cpp's mmap does there (Metal keeps what it wraps resident: such layers are not paged).

Every tensor was validated by ``ModelFile`` (type, shape against its block size, bytes inside the
data section, no overlaps) before it gets here: ggml aborts the process on a bad one.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import ggml
from ..errors import ModelLoadError
from ..model_file import ModelFile, TensorInfo
from .backend import ALIGNMENT, ComputeError, DeviceBuffer, FileBuffer

#: The CPU backend's extra buffer type that repacks weights (llama.cpp's CPU_REPACK).
REPACK_BUFFER = "CPU_REPACK"


def _new_tensor(g: ggml.Ggml, ctx: int, info: TensorInfo) -> int:
    ne = info.shape[::-1]  # ggml's order: the row (fastest-varying) dimension first
    qtype = int(info.qtype)
    if len(ne) == 1:
        return int(g.ggml_new_tensor_1d(ctx, qtype, ne[0]))
    if len(ne) == 2:
        return int(g.ggml_new_tensor_2d(ctx, qtype, ne[0], ne[1]))
    return int(g.ggml_new_tensor_3d(ctx, qtype, *ne))


#: the most bytes between two tensors of one mapped run (alignment padding is far less)
RUN_GAP = 4096


def _adjacent_runs(infos: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Tensors in file order, grouped where each starts within ``RUN_GAP`` of the end of
    the one before (``ModelFile`` refused overlapping tensors)."""
    runs: list[list[TensorInfo]] = []
    end = 0
    for info in sorted(infos, key=lambda i: i.offset):
        if runs and info.offset - end <= RUN_GAP:
            runs[-1].append(info)
        else:
            runs.append([info])
        end = info.offset + info.n_bytes
    return runs


class Repacker:
    """Tells which weights the CPU backend can repack, by asking it: a description of the
    weight is initialised in a tiny buffer of the repacking type, which records the layout it
    would use (``extra``) or none."""

    def __init__(self) -> None:
        self.g = g = ggml.load()
        self.buffer_type = g.extra_buffer_types().get(REPACK_BUFFER, 0)
        self._probe_buffer = (g.ggml_backend_buft_alloc_buffer(self.buffer_type, 64)
                              if self.buffer_type else 0)

    def can_repack(self, info: TensorInfo) -> bool:
        if not self._probe_buffer or len(info.shape) not in (2, 3):
            return False
        g = self.g
        ctx = g.ggml_init(ggml.InitParams(g.ggml_tensor_overhead() * 2, None, True))
        try:
            t = _new_tensor(g, ctx, info)
            g.ggml_backend_buffer_init_tensor(self._probe_buffer, t)
            return bool(g.tensor(t).extra)
        finally:
            g.ggml_free(ctx)

    def close(self) -> None:
        if self._probe_buffer:
            self.g.ggml_backend_buffer_free(self._probe_buffer)
            self._probe_buffer = 0


class WeightSet:
    """ggml tensors for a set of the file's tensors, by GGUF name; with ``repack``, the names in
    ``repack`` that the CPU can repack also get an interleaved copy (``packed``).

    The copy serves decode steps (one token), where it is 10-15 % faster; prefill mostly keeps
    reading the file's layout, where ggml's batched products were 1.6x faster than the repacked
    ones (Q4_K, 1b shapes, 2 threads), except for the types ``engine.window.PREFILL_PACKED``
    lists (MXFP4): so a repacking device holds both, and only repacks when the copies fit
    easily (see ``engine.model.should_repack``).
    """

    def __init__(self, mf: ModelFile, buffer: FileBuffer, infos: Iterable[TensorInfo], *,
                 repack: Iterable[str] = (), copy_to: int | None = None,
                 map_on: int | None = None) -> None:
        self.g = g = ggml.load()
        infos = list(infos)
        self.ctx = g.ggml_init(ggml.InitParams(g.ggml_tensor_overhead() * (len(infos) + 1),
                                               None, True))
        if not self.ctx:
            raise MemoryError("ggml could not create a context for the weights")
        self.tensors: dict[str, int] = {}
        self.repacked: dict[str, int] = {}
        self.repacked_bytes = 0
        self._repack_ctx = self._repack_buffer = 0
        self.device: DeviceBuffer | None = None
        self._mapped: list[int] = []  # a device's buffers over the mapping (map_on)
        self.mapped_bytes = 0  # what they span
        try:
            for info in infos:
                self.tensors[info.name] = self._describe(mf, info)
            if map_on is not None and infos:
                self._map(buffer, infos, map_on)
            elif copy_to is None:
                for info in infos:
                    buffer.place(self.tensors[info.name], info.offset)
            else:
                self._copy(buffer, infos, copy_to)
            wanted = set(repack)
            if wanted:
                self._repack(buffer, [i for i in infos if i.name in wanted])
        except BaseException:
            self.close()
            raise

    def _describe(self, mf: ModelFile, info: TensorInfo) -> int:
        g = self.g
        if not 1 <= len(info.shape) <= 3:
            raise ModelLoadError(mf.path, f"tensor {info.name!r} has {len(info.shape)} "
                                          "dimensions")
        t = _new_tensor(g, self.ctx, info)
        if g.ggml_nbytes(t) != info.n_bytes:  # the reader's size and ggml's must agree
            raise ModelLoadError(
                mf.path, f"tensor {info.name!r} holds {info.n_bytes} bytes, but ggml computes "
                f"{g.ggml_nbytes(t)} for its type and shape: the file is corrupt")
        g.ggml_set_name(t, info.name.encode()[:63])
        return t

    def _copy(self, buffer: FileBuffer, infos: list[TensorInfo], buffer_type: int) -> None:
        """Give every tensor a copy of its bytes in a device's memory (a GPU's VRAM, where
        the file cannot be mapped): read once from the mapping, then the pages may go."""
        self.device = DeviceBuffer(self.ctx, buffer_type)
        for info in infos:
            self.g.ggml_backend_tensor_set(self.tensors[info.name], buffer.base + info.offset, 0,
                                           info.n_bytes)

    def _map(self, buffer: FileBuffer, infos: list[TensorInfo], device: int) -> None:
        """Point every tensor at its bytes in the mapping through buffers of ``device``, one
        per run of adjacent tensors (a span from the first to the last could cover most of
        the file: Metal keeps what it wraps resident). Nothing is copied.

        ggml's Metal returns a buffer even when wrapping fails (and aborts on its first use):
        short runs of one window's tensors make that unlikely; nothing here can catch it."""
        g = self.g
        for run in _adjacent_runs(infos):
            lo = run[0].offset // ALIGNMENT * ALIGNMENT  # the mapping's base is aligned
            hi = max(i.offset + i.n_bytes for i in run)
            handle = g.ggml_backend_dev_buffer_from_host_ptr(
                device, buffer.base + lo, hi - lo, max(i.n_bytes for i in run))
            if not handle:
                name = (g.ggml_backend_dev_name(device) or b"?").decode()
                raise ComputeError(f"{name} could not map the model file's layers")
            self._mapped.append(handle)
            self.mapped_bytes += hi - lo
            for info in run:
                status = g.ggml_backend_tensor_alloc(handle, self.tensors[info.name],
                                                     buffer.base + info.offset)
                if status != ggml.STATUS_SUCCESS:
                    raise ComputeError(f"ggml refused a tensor at file offset {info.offset}")

    @property
    def device_bytes(self) -> int:
        """Device memory the copies take (0 for weights read from the file mapping)."""
        device = self.device  # once: close() may clear it meanwhile (a status page asks)
        return device.size if device is not None else 0

    def _repack(self, buffer: FileBuffer, infos: list[TensorInfo]) -> None:
        repacker = Repacker()
        try:
            chosen = [i for i in infos if repacker.can_repack(i)]
            if not chosen:
                return
            g = self.g
            self._repack_ctx = g.ggml_init(ggml.InitParams(
                g.ggml_tensor_overhead() * (len(chosen) + 1), None, True))
            made = [(i, _new_tensor(g, self._repack_ctx, i)) for i in chosen]
            self._repack_buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(
                self._repack_ctx, repacker.buffer_type)
            if not self._repack_buffer:
                raise ComputeError("not enough memory to repack the weights")
            for info, t in made:  # setting the bytes is what converts them
                g.ggml_backend_tensor_set(t, buffer.base + info.offset, 0, info.n_bytes)
                self.repacked[info.name] = t
            self.repacked_bytes = int(g.ggml_backend_buffer_get_size(self._repack_buffer))
        finally:
            repacker.close()

    def __getitem__(self, name: str) -> int:
        """The file-backed tensor."""
        return self.tensors[name]

    def get(self, name: str) -> int | None:
        return self.tensors.get(name)

    def packed(self, name: str) -> int:
        """The tensor to multiply one token with: the repacked copy where there is one."""
        return self.repacked.get(name) or self.tensors[name]

    def close(self) -> None:
        g = self.g
        if self.device is not None:
            self.device.close()
            self.device = None
        for handle in self._mapped:
            g.ggml_backend_buffer_free(handle)
        self._mapped = []
        if self._repack_buffer:
            g.ggml_backend_buffer_free(self._repack_buffer)
            self._repack_buffer = 0
        if self._repack_ctx:
            g.ggml_free(self._repack_ctx)
            self._repack_ctx = 0
        if self.ctx:
            g.ggml_free(self.ctx)
            self.ctx = 0
        self.tensors = {}
        self.repacked = {}
