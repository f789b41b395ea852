"""Two LLVM operations numba does not expose: a software prefetch and a float bit-cast.

Software prefetch of the weight bytes a few KiB ahead nearly doubled the throughput of weights
streaming from DRAM in the prototype (the hardware prefetcher stops at page boundaries). numba has
no float16 type on the CPU, so half-precision scales are decoded from their bits, which needs a
uint32 -> float32 bit-cast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx: Any, arr: Any, index: Any) -> Any:
    """Hint the CPU to fetch the cache line holding ``arr.ravel()[index]``; never faults."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, index)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arr_ty = signature.args[0]
        ary = context.make_array(arr_ty)(context, builder, args[0])
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        itemsize = context.get_abi_sizeof(context.get_data_type(arr_ty.dtype))
        idx = builder.sext(args[1], ir.IntType(64)) if args[1].type.width < 64 else args[1]
        addr = builder.add(base, builder.mul(idx, ir.Constant(ir.IntType(64), itemsize)))
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.inttoptr(addr, i8p)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, locality 3 (keep in all cache levels), data cache
        builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                          ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def bits_to_f32(typingctx: Any, bits: Any) -> Any:
    """Reinterpret the low 32 bits of an integer as an IEEE float32."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True)
def half_to_f32(h: int) -> float:
    """Decode IEEE half-precision bits (normals, subnormals, zero) without a branch.

    Shifting the 15 exponent+mantissa bits into float32 position and scaling by 2**112 rebiases
    the exponent (15 -> 127) and turns half subnormals into the right float32 values.
    """
    hv = np.uint32(h)
    mag = bits_to_f32((hv & np.uint32(0x7FFF)) << np.uint32(13)) * np.float32(5.192296858534828e33)
    return -mag if hv & np.uint32(0x8000) else mag
