"""The only module that calls into ggml: the C signatures of the functions the engine uses.

ggml (the tensor library under llama.cpp) computes every layer; Python builds the graphs. The
library comes from the pinned llama-cpp-python build that ``scripts/setup`` installs
(``llama_cpp/lib/libggml*.so``), found without importing ``llama_cpp`` and loaded once per
process (the dynamic loader returns the same copy if llama.cpp itself is loaded too).

Why so careful: a ctypes signature that does not match the C declaration corrupts the stack or
the heap, and a failed ``GGML_ASSERT`` aborts the whole process. So every signature here was
written from ggml's headers of the pinned version (``ggml.h``, ``ggml-backend.h``,
``ggml-alloc.h``, ``ggml-cpu.h`` of ggml 0.25.3), the loader refuses any other version with a
clear error instead of guessing, and ``tests/test_ggml.py`` checks the signatures and the struct
layouts against the library itself. Callers validate their inputs before they reach ggml.

Functions of the CPU backend are reached through the backend registry (the CPU device and its
registry's ``get_proc_address``), never by symbol, so the same code runs on a build whose CPU
backend is a separately loaded module per instruction set (``GGML_BACKEND_DL`` with
``GGML_CPU_ALL_VARIANTS``, as the add-on's image is built) and on a single-library build.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from ctypes import (
    POINTER,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_void_p,
)
from pathlib import Path
from typing import Any

from .errors import PrimaError

#: The ggml release these signatures were written from (llama-cpp-python 0.3.36 ships it).
PINNED_VERSION = "0.25.3"
#: Overrides where the libraries are found (a directory holding libggml-base and libggml).
LIB_DIR_ENV = "PRIMA_GGML_LIB_DIR"

_LOG = logging.getLogger("prima_node.ggml")

# -- constants of the pinned headers --------------------------------------------------------------

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64

TYPE_F32, TYPE_F16, TYPE_I32, TYPE_I64 = 0, 1, 26, 27
ROPE_NORMAL, ROPE_NEOX = 0, 2
PREC_F32 = 10
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2  # enum ggml_backend_dev_type
STATUS_SUCCESS = 0
LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
LOG_CONT = 5


class GgmlUnavailableError(PrimaError):
    """The ggml library cannot be used: missing, or not the pinned version."""


class InitParams(ctypes.Structure):
    """``struct ggml_init_params``."""

    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class DevCaps(ctypes.Structure):
    """``struct ggml_backend_dev_caps``."""

    _fields_ = [("async_ops", c_bool), ("host_buffer", c_bool),
                ("buffer_from_host_ptr", c_bool), ("events", c_bool), ("mmap_support", c_bool)]


class DevProps(ctypes.Structure):
    """``struct ggml_backend_dev_props``."""

    _fields_ = [("name", c_char_p), ("description", c_char_p), ("memory_free", c_size_t),
                ("memory_total", c_size_t), ("type", c_int), ("device_id", c_char_p),
                ("caps", DevCaps)]


class _DevPropsRoom(ctypes.Union):
    """Room for the props struct with a margin: ggml writes into it, and a build whose struct
    grew would otherwise write past ours."""

    _fields_ = [("props", DevProps), ("_margin", ctypes.c_uint8 * 512)]


class TensorStruct(ctypes.Structure):
    """``struct ggml_tensor``: read for shapes, strides and the fields ggml leaves to callers
    (``extra`` tells whether a weight was repacked); never written."""

    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_P = c_void_p  # every opaque pointer: context, tensor, graph, backend, buffer, device, ...
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)

#: name -> (result type, argument types), exactly as declared in the pinned headers.
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # ggml.h: library, contexts, types
    "ggml_version": (c_char_p, []),
    "ggml_init": (_P, [InitParams]),
    "ggml_free": (None, [_P]),
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_graph_overhead_custom": (c_size_t, [c_size_t, c_bool]),
    "ggml_type_size": (c_size_t, [c_int]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_nbytes": (c_size_t, [_P]),
    "ggml_nelements": (c_int64, [_P]),
    "ggml_log_set": (None, [_LOG_CALLBACK, c_void_p]),
    "ggml_quantize_requires_imatrix": (c_bool, [c_int]),
    "ggml_quantize_chunk": (c_size_t, [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64,
                                       c_void_p]),
    # ggml.h: tensors and the operations the graphs use
    "ggml_new_tensor_1d": (_P, [_P, c_int, c_int64]),
    "ggml_new_tensor_2d": (_P, [_P, c_int, c_int64, c_int64]),
    "ggml_new_tensor_3d": (_P, [_P, c_int, c_int64, c_int64, c_int64]),
    "ggml_set_name": (_P, [_P, c_char_p]),
    "ggml_set_input": (None, [_P]),
    "ggml_set_output": (None, [_P]),
    "ggml_view_2d": (_P, [_P, _P, c_int64, c_int64, c_size_t, c_size_t]),
    "ggml_view_4d": (_P, [_P, _P, c_int64, c_int64, c_int64, c_int64, c_size_t, c_size_t,
                          c_size_t, c_size_t]),
    "ggml_reshape_2d": (_P, [_P, _P, c_int64, c_int64]),
    "ggml_reshape_3d": (_P, [_P, _P, c_int64, c_int64, c_int64]),
    "ggml_permute": (_P, [_P, _P, c_int, c_int, c_int, c_int]),
    "ggml_add": (_P, [_P, _P, _P]),
    "ggml_mul": (_P, [_P, _P, _P]),
    "ggml_rms_norm": (_P, [_P, _P, c_float]),
    "ggml_mul_mat": (_P, [_P, _P, _P]),
    "ggml_mul_mat_id": (_P, [_P, _P, _P, _P]),
    "ggml_soft_max": (_P, [_P, _P]),
    "ggml_argsort_top_k": (_P, [_P, _P, c_int]),
    "ggml_sum_rows": (_P, [_P, _P]),
    "ggml_div": (_P, [_P, _P, _P]),
    "ggml_clamp": (_P, [_P, _P, c_float, c_float]),
    "ggml_scale": (_P, [_P, _P, c_float]),
    "ggml_cont": (_P, [_P, _P]),
    "ggml_geglu_split": (_P, [_P, _P, _P]),
    "ggml_swiglu": (_P, [_P, _P]),
    "ggml_view_3d": (_P, [_P, _P, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t]),
    "ggml_tanh": (_P, [_P, _P]),
    "ggml_get_rows": (_P, [_P, _P, _P]),
    "ggml_set_rows": (_P, [_P, _P, _P, _P]),
    "ggml_rope_ext": (_P, [_P, _P, _P, _P, c_int, c_int, c_int, c_float, c_float, c_float,
                           c_float, c_float, c_float]),
    "ggml_swiglu_split": (_P, [_P, _P, _P]),
    "ggml_flash_attn_ext": (_P, [_P, _P, _P, _P, _P, c_float, c_float, c_float]),
    "ggml_flash_attn_ext_add_sinks": (None, [_P, _P]),
    "ggml_add_id": (_P, [_P, _P, _P, _P]),
    "ggml_swiglu_oai": (_P, [_P, _P, _P, c_float, c_float]),
    "ggml_prec_set_acc": (c_bool, [_P, c_int]),
    "ggml_new_graph_custom": (_P, [_P, c_size_t, c_bool]),
    "ggml_build_forward_expand": (None, [_P, _P]),
    # ggml-alloc.h
    "ggml_gallocr_new": (_P, [_P]),
    "ggml_gallocr_free": (None, [_P]),
    "ggml_gallocr_reserve": (c_bool, [_P, _P]),
    "ggml_gallocr_alloc_graph": (c_bool, [_P, _P]),
    "ggml_gallocr_get_buffer_size": (c_size_t, [_P, c_int]),
    "ggml_backend_alloc_ctx_tensors_from_buft": (_P, [_P, _P]),
    # ggml-backend.h: buffers and tensors in them
    "ggml_backend_cpu_buffer_from_ptr": (_P, [c_void_p, c_size_t]),
    "ggml_backend_buft_alloc_buffer": (_P, [_P, c_size_t]),
    "ggml_backend_buft_name": (c_char_p, [_P]),
    "ggml_backend_buffer_free": (None, [_P]),
    "ggml_backend_buffer_get_size": (c_size_t, [_P]),
    "ggml_backend_buffer_init_tensor": (c_int, [_P, _P]),
    "ggml_backend_tensor_alloc": (c_int, [_P, _P, c_void_p]),
    "ggml_backend_tensor_set": (None, [_P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": (None, [_P, c_void_p, c_size_t, c_size_t]),
    # ggml-backend.h: backends, devices, the registry
    "ggml_backend_free": (None, [_P]),
    "ggml_backend_graph_compute": (c_int, [_P, _P]),
    "ggml_backend_dev_by_type": (_P, [c_int]),
    "ggml_backend_dev_description": (c_char_p, [_P]),
    "ggml_backend_dev_init": (_P, [_P, c_char_p]),
    "ggml_backend_dev_buffer_type": (_P, [_P]),
    "ggml_backend_dev_backend_reg": (_P, [_P]),
    "ggml_backend_reg_get_proc_address": (c_void_p, [_P, c_char_p]),
    "ggml_backend_load_all_from_path": (None, [c_char_p]),
    # ggml-backend.h: every device a build has (GPUs for windows' GPU layers)
    "ggml_backend_dev_count": (c_size_t, []),
    "ggml_backend_dev_get": (_P, [c_size_t]),
    "ggml_backend_dev_name": (c_char_p, [_P]),
    "ggml_backend_dev_type": (c_int, [_P]),
    "ggml_backend_dev_memory": (None, [_P, POINTER(c_size_t), POINTER(c_size_t)]),
    "ggml_backend_dev_get_props": (None, [_P, c_void_p]),
    "ggml_backend_dev_buffer_from_host_ptr": (_P, [_P, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_reg_name": (c_char_p, [_P]),
    # the backends a build registered, and how many devices each found
    "ggml_backend_reg_count": (c_size_t, []),
    "ggml_backend_reg_get": (_P, [c_size_t]),
    "ggml_backend_reg_dev_count": (c_size_t, [_P]),
    "ggml_backend_buffer_clear": (None, [_P, ctypes.c_uint8]),
    "ggml_backend_buffer_is_host": (c_bool, [_P]),
    "ggml_backend_synchronize": (None, [_P]),
    "ggml_backend_dev_supports_op": (c_bool, [_P, _P]),
    "ggml_graph_n_nodes": (c_int, [_P]),
    "ggml_graph_node": (_P, [_P, c_int]),
    "ggml_op_desc": (c_char_p, [_P]),
    "ggml_type_name": (c_char_p, [c_int]),
}

#: CPU-backend functions reached through the registry: name -> ctypes prototype.
CPU_PROCS: dict[str, Any] = {
    "ggml_backend_set_n_threads": ctypes.CFUNCTYPE(None, _P, c_int),
    "ggml_backend_dev_get_extra_bufts": ctypes.CFUNCTYPE(POINTER(c_void_p), _P),
}


def library_dir() -> Path:
    """Where the pinned llama-cpp-python keeps its ggml libraries (``$PRIMA_GGML_LIB_DIR``
    overrides). ``find_spec`` locates the package without importing it (which would load
    llama.cpp as well)."""
    env = os.environ.get(LIB_DIR_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlUnavailableError(
            "the ggml library is missing: it comes with llama-cpp-python, which scripts/setup "
            "builds and installs (or set PRIMA_GGML_LIB_DIR to a directory holding "
            "libggml-base and libggml)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _shared_library(directory: Path, stem: str) -> Path:
    """The file the dynamic linker itself would load for ``stem``: the one named by its soname
    (``libggml-base.so.0``) where there is one. Wheels store the soname, the versioned and the
    plain names as separate copies, and the linker knows a loaded copy by the path it opened:
    loading another name would map the library twice once llama.cpp (whose libllama needs the
    soname) is loaded in the same process, with two copies of ggml's global state."""
    for pattern in (f"lib{stem}.so.*", f"lib{stem}.so", f"lib{stem}.*.dylib",
                    f"lib{stem}.dylib", f"{stem}.dll"):
        found = sorted(directory.glob(pattern), key=lambda p: len(p.name))
        if found:
            return found[0]
    raise GgmlUnavailableError(f"lib{stem} is not in {directory}: reinstall llama-cpp-python "
                               "with scripts/setup")


class Ggml:
    """The loaded libraries with typed functions as attributes (``g.ggml_add(ctx, a, b)``),
    the CPU device, and the CPU backend's functions from its registry."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self._base = ctypes.CDLL(str(_shared_library(directory, "ggml-base")))
            self._registry = ctypes.CDLL(str(_shared_library(directory, "ggml")))
        except OSError as exc:
            raise GgmlUnavailableError(f"cannot load ggml from {directory}: {exc}") from None
        self._base.ggml_version.restype = c_char_p
        version = (self._base.ggml_version() or b"").decode()
        if version != PINNED_VERSION:
            raise GgmlUnavailableError(
                f"{directory} holds ggml {version or '(unknown)'}, but this engine is written "
                f"for ggml {PINNED_VERSION} (llama-cpp-python 0.3.36): run scripts/setup")
        self.version = version
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(self._base, name, None) or getattr(self._registry, name, None)
            if fn is None:
                raise GgmlUnavailableError(f"{directory}: ggml lacks {name}")
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        self.ggml_log_set(_LOG_FORWARDER, None)
        self.cpu_device = self._cpu_device()
        self.cpu_description = (self.ggml_backend_dev_description(self.cpu_device) or b"").decode()
        reg = self.ggml_backend_dev_backend_reg(self.cpu_device)
        for name, proto in CPU_PROCS.items():
            address = self.ggml_backend_reg_get_proc_address(reg, name.encode())
            if not address:
                raise GgmlUnavailableError(f"the CPU backend in {directory} lacks {name}")
            setattr(self, name, proto(address))

    def __getattr__(self, name: str) -> Any:  # the functions bound in __init__, for mypy
        raise AttributeError(name)

    def _cpu_device(self) -> int:
        dev = self.ggml_backend_dev_by_type(DEVICE_CPU)
        if not dev:  # a build with loadable backends: load the best CPU variant
            self.ggml_backend_load_all_from_path(str(self.directory).encode())
            dev = self.ggml_backend_dev_by_type(DEVICE_CPU)
        if not dev:
            raise GgmlUnavailableError(f"no CPU backend could be loaded from {self.directory}")
        return int(dev)

    # -- small conveniences over the struct ---------------------------------------------------

    @staticmethod
    def tensor(ptr: int) -> TensorStruct:
        """The fields of a tensor (a view of ggml's memory: read, never kept)."""
        return TensorStruct.from_address(ptr)

    def shape(self, ptr: int) -> tuple[int, ...]:
        """ggml's ne[] (fastest-varying first), all four dimensions."""
        return tuple(self.tensor(ptr).ne)

    def backends(self) -> dict[str, int]:
        """Every backend the build registered (CPU, CUDA, MTL for Metal, ...) and the devices it
        found (a GPU backend whose driver is missing or too old finds none)."""
        regs = [self.ggml_backend_reg_get(i) for i in range(self.ggml_backend_reg_count())]
        return {(self.ggml_backend_reg_name(r) or b"?").decode(): int(
            self.ggml_backend_reg_dev_count(r)) for r in regs}

    def devices(self) -> list[int]:
        """Every device the build registered (the CPU, and any GPU its backends found)."""
        return [int(self.ggml_backend_dev_get(i)) for i in range(self.ggml_backend_dev_count())]

    def memory(self, device: int) -> tuple[int, int]:
        """A device's (free, total) memory in bytes, as its backend reports them now."""
        free, total = c_size_t(0), c_size_t(0)
        self.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)

    def caps(self, device: int) -> DevCaps:
        """A device's capabilities. Asking fills its props, memory included: on CUDA that
        creates a context on the card, so only for a device in use."""
        room = _DevPropsRoom()
        self.ggml_backend_dev_get_props(device, ctypes.byref(room))
        return DevCaps.from_buffer_copy(room.props.caps)

    def extra_buffer_types(self) -> dict[str, int]:
        """The CPU device's extra buffer types by name (``CPU_REPACK``, ...)."""
        out: dict[str, int] = {}
        array = self.ggml_backend_dev_get_extra_bufts(self.cpu_device)
        i = 0
        while array and array[i]:
            out[(self.ggml_backend_buft_name(array[i]) or b"").decode()] = int(array[i])
            i += 1
        return out


def type_name(qtype: int) -> str:
    """ggml's name of a tensor type (q4_K, f16, ...)."""
    return (load().ggml_type_name(qtype) or b"?").decode()


_last_level = [logging.DEBUG]  # GGML_LOG_LEVEL_CONT continues the previous message's level


def _forward_log(level: int, text: bytes | None, _user: int | None) -> None:
    if level != LOG_CONT:
        _last_level[0] = LOG_LEVELS.get(level, logging.DEBUG)
    if text:
        _LOG.log(_last_level[0], "%s", text.decode(errors="replace").rstrip())


#: ggml keeps this pointer for the life of the process: module level, never collected
_LOG_FORWARDER = _LOG_CALLBACK(_forward_log)


_LOADED: Ggml | None = None
_LOCK = threading.Lock()


def load() -> Ggml:
    """The process's one ggml (loaded on first use); GgmlUnavailableError says what to do if not."""
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            _LOADED = Ggml(library_dir())
        return _LOADED


__all__ = [
    "PINNED_VERSION",
    "Ggml",
    "GgmlUnavailableError",
    "InitParams",
    "TensorStruct",
    "library_dir",
    "load",
    "type_name",
]
