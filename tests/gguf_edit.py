"""Copy a GGUF file through gguf-py's writer, altering keys or tensors on the way: how the tests
make broken files, and files of weight types the project's own quantiser does not write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

#: given a tensor of the source, the array and raw type to write instead (None: copy it)
Transform = Callable[[gguf.ReaderTensor], tuple[np.ndarray, gguf.GGMLQuantizationType] | None]


def rewrite(src: Path, dst: Path, drop_key: str | None = None, drop_tensor: str | None = None,
            set_key: tuple[str, object] | None = None,
            retype: tuple[str, gguf.GGMLQuantizationType] | None = None,
            transform: Transform | None = None,
            add: dict[str, np.ndarray] | None = None) -> Path:
    """Copy ``src`` to ``dst``, dropping or setting one key, dropping one tensor, giving one
    tensor another type (zero bytes of it), transforming tensors, or adding float32 ones."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", drop_key):
            continue
        value = field.contents()
        if set_key and name == set_key[0]:
            value = set_key[1]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    if set_key and not r.get_field(set_key[0]):
        value = set_key[1]
        if isinstance(value, float):
            w.add_float32(set_key[0], value)
        elif isinstance(value, list):  # a per-layer array
            w.add_array(set_key[0], value)
        else:
            w.add_string(set_key[0], str(value))
    for t in r.tensors:
        if t.name == drop_tensor:
            continue
        if retype and t.name == retype[0]:
            block, size = gguf.GGML_QUANT_SIZES[retype[1]]
            w.add_tensor(t.name, np.zeros((int(t.shape[1]), int(t.shape[0]) // block * size),
                                          np.uint8), raw_dtype=retype[1])
            continue
        new = transform(t) if transform is not None else None
        if new is not None:
            w.add_tensor(t.name, new[0], raw_dtype=new[1])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, values in (add or {}).items():
        w.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
