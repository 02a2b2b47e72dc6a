"""Prefill on Intel AMX: a 16x16 block of dot products per instruction.

AMX adds eight tile registers (up to 16 rows x 64 bytes each) and a unit that
multiplies them: `tdpbsud C, A, B` adds to each int32 C[m, n] the dot product
of row m of A (signed bytes) with column n of B (unsigned bytes, stored
"VNNI-4": row kk of B holds B[4kk..4kk+3, n] for every n, 4 bytes per
column). One instruction does 16 x 16 x 64 = 16384 multiply-adds; a 256-bit
`vpdpbusd` does 32.

Why minislm's tiles fit AMX as they are. In an int8 tile of `packed.py` the
64 bytes are 16 rows x 4 consecutive inputs, row r in bytes 4r..4r+3: exactly
one row of an AMX B tile whose columns are the 16 weight rows. Consecutive
tiles are consecutive B rows, so `tileloadd` reads B straight from the
weights (stride 64); int4 tiles are first split into their low and high
nibbles (inputs 8j..8j+3 and 8j+4..8j+7), two B rows per tile, in a 1 KB
buffer that stays in L1. A is 16 tokens x one activation group of int8
activations, a plain row-major slice. C is then 16 tokens x 16 weight rows:
each C row is the integer sum the VNNI kernel holds in its vector of 16 rows,
and the float32 epilogue below applies the scales with the same operations in
the same order, so AMX returns the same bits as the other paths.

Numba and llvmlite know nothing of AMX: the instructions are written as
inline assembly (LLVM assembles them once the native assembly parser is
initialised, below), with fixed tile registers: tmm0 = C, tmm1 = A, tmm2 = B.
The operating system must have granted the tile state (`cpu.amx_permission`)
before any of this runs: `cpu.int8_gemm_path()` only picks AMX when it has.

bf16 weights use `tdpbf16ps` (16 x 16 x 32 bf16 products, summed in float32)
with no epilogue: C accumulates over all inputs. A = 16 weight rows x 32
inputs, copied per pair of row blocks into contiguous 1 KB tiles
(`tiles_of_rows`: loading them straight from the checkpoint's rows, 2 x inputs
bytes apart, was ~2x slower); B = the activations, repacked per call into
pairs of inputs per token (VNNI-2). Each A tile meets 4 B tiles (2 token
tiles x hi, lo) in 8 instructions. Activations are float32: each is split into two
bf16 numbers, hi = bf16(x) and lo = bf16(x - hi), and both are multiplied
(2 instructions), so x is represented to 16 significant bits (relative error
<= 2**-16) instead of bf16's 8; the products are exact in float32.
"""

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import reference as ref
from .activations import activation_buffers, check_shapes, prepare_token
from .scalars import bits_to_f32, round_to_bf16
from .simd import (F32, I8, I32, _load_vec, _splat, _vec, act_group_epilogue, array_args, check_arrays,
                   group_arrays, group_epilogue, group_scale_and_offset, index_helpers)

llvm.initialize_native_asmparser()   # inline assembly needs it; Numba does not initialise it

TILE_TOKENS = 16
I64 = ir.IntType(64)


def tile_config(shapes):
    """The 64-byte operand of `ldtilecfg` (palette 1): `shapes` lists
    (rows, bytes per row) of tmm0, tmm1, ..."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for i, (rows, colsb) in enumerate(shapes):
        cfg[16 + 2 * i: 18 + 2 * i] = np.array([colsb], np.uint16).view(np.uint8)
        cfg[48 + i] = rows
    return cfg


def packed_config(act_group):
    """tmm0-3 C: 16 tokens x 16 int32; tmm4-5 A: 16 tokens x act_group int8;
    tmm6-7 B: act_group/4 rows x 64 bytes."""
    return tile_config([(16, 64)] * 4 + [(16, act_group)] * 2 + [(act_group // 4, 64)] * 2)


def _asm(builder, text, constraint="", args=()):
    fty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    builder.call(ir.InlineAsm(fty, text, (constraint + "," if constraint else "") + "~{memory}",
                              side_effect=True), list(args))


def _ptr(builder, array, index):
    return builder.bitcast(builder.gep(array.data, [index]), ir.PointerType(I8))


def amx_packed_kernel():
    """The intrinsic for one 16-row block and 16 tokens of a packed weight."""

    @intrinsic
    def amx_block(typingctx, cfg, rows, scales, zeros, offsets, zero, xq, x_scale, x_gsum, block, t0,
                  cbuf, out):
        """out[t0:t0+16, 16b:16b+16] = x_hat @ W[those rows].T

        rows: the block's codes as AMX B rows, uint8 (in_p/4, 64): row kk holds
        codes[16b+r, 4kk..4kk+3] at bytes 4r..4r+3; xq: int8 (T, in_p); cbuf:
        int32 (BATCH, 16, 16) for the C tiles; the rest as in
        `simd.packed_block_kernel`."""
        check_arrays("amx_block", [(cfg, types.uint8, 1), (rows, types.uint8, 2), (xq, types.int8, 2),
                                   (x_scale, types.float32, 2), (x_gsum, types.float32, 2),
                                   (cbuf, types.int32, 3), (out, types.float32, 2)]
                     + group_arrays(scales, zeros, offsets))
        sig = types.void(cfg, rows, scales, zeros, offsets, types.float32, xq, x_scale, x_gsum,
                         block, t0, cbuf, out)

        def codegen(context, builder, signature, args):
            return _emit_amx_packed(context, builder, signature, args)

        return sig, codegen

    return amx_block


BATCH = 4   # activation groups in flight: C tiles tmm0-3, A tiles tmm4-5, B tiles tmm6-7


def _emit_amx_packed(context, builder, signature, args):
    arrays = array_args(context, builder, signature, args)
    cfg_a, rows_a, scales_a, zeros_a, offsets_a = arrays[:5]
    xq_a, xs_a, xg_a = arrays[6:9]
    cbuf_a, out_a = arrays[11:13]
    f16_scales = signature.args[2].dtype == types.uint16
    as_intp, const, dim = index_helpers(context, builder)

    block, t0 = as_intp(args[9]), as_intp(args[10])
    n_groups, n_act = dim(scales_a, 1), dim(xs_a, 1)
    n_in, out_stride = dim(xq_a, 1), dim(out_a, 1)
    act_group = builder.udiv(n_in, n_act)
    acts_per_group = builder.udiv(n_act, n_groups)
    sz_base = builder.mul(block, builder.mul(n_groups, const(16)))
    v16f, v16i = _vec(F32, 16), _vec(I32, 16)
    zero_f = ir.Constant(v16f, None)
    total = [cgutils.alloca_once_value(builder, zero_f) for _ in range(TILE_TOKENS)]
    for t in range(TILE_TOKENS):
        builder.store(zero_f, total[t])
    group = cgutils.alloca_once_value(builder, const(0))       # the current weight group
    in_group = cgutils.alloca_once_value(builder, const(0))    # activation groups done in it
    scale = cgutils.alloca_once_value(builder, zero_f)         # its scales s
    offset = cgutils.alloca_once_value(builder, zero_f)        # and c = b - s * z
    sixty_four = ir.Constant(I64, 64)

    def issue(a, i):
        """C_i = A (16 tokens x activation group a) . B (its act_group/4 rows)."""
        b_ptr = _ptr(builder, rows_a, builder.mul(builder.mul(a, act_group), const(16)))
        a_ptr = _ptr(builder, xq_a, builder.add(builder.mul(t0, n_in), builder.mul(a, act_group)))
        _asm(builder, f"tilezero %tmm{i}")
        _asm(builder, f"tileloadd ($0,$1,1), %tmm{4 + i % 2}", "r,r", [a_ptr, n_in])
        _asm(builder, f"tileloadd ($0,$1,1), %tmm{6 + i % 2}", "r,r", [b_ptr, sixty_four])
        _asm(builder, f"tdpbsud %tmm{6 + i % 2}, %tmm{4 + i % 2}, %tmm{i}")

    def finish(a, i):
        """The float32 epilogue of `simd.py`, on C_i's integer sums, in the same order."""
        start = builder.icmp_unsigned("==", builder.load(in_group), const(0))
        with builder.if_then(start):   # entering a weight group: its scales and offsets
            at = builder.add(sz_base, builder.mul(builder.load(group), const(16)))
            s, c = group_scale_and_offset(builder, scales_a, zeros_a, offsets_a, args[5], at, 16, f16_scales)
            builder.store(s, scale)
            builder.store(c, offset)
        s = builder.load(scale)
        for t in range(TILE_TOKENS):
            isum = _load_vec(builder, cbuf_a.data, const(256 * i + 16 * t), v16i)
            x_scale = builder.load(builder.gep(xs_a.data, [builder.add(builder.mul(builder.add(t0, const(t)), n_act), a)]))
            builder.store(act_group_epilogue(builder, s, x_scale, isum, builder.load(total[t])), total[t])
        builder.store(builder.add(builder.load(in_group), const(1)), in_group)
        done = builder.icmp_unsigned("==", builder.load(in_group), acts_per_group)
        with builder.if_then(done):    # the group's last: its zero code and offset
            g = builder.load(group)
            c = builder.load(offset)
            for t in range(TILE_TOKENS):
                xg_at = builder.add(builder.mul(builder.add(t0, const(t)), n_groups), g)
                x_gsum = _splat(builder, builder.load(builder.gep(xg_a.data, [xg_at])), 16)
                builder.store(group_epilogue(builder, c, x_gsum, builder.load(total[t])), total[t])
            builder.store(builder.add(g, const(1)), group)
            builder.store(const(0), in_group)

    def run(first, count):
        for i in range(count):
            issue(builder.add(first, const(i)), i)
        for i in range(count):
            _asm(builder, f"tilestored %tmm{i}, ($0,$1,1)", "r,r", [_ptr(builder, cbuf_a, const(256 * i)), sixty_four])
        for i in range(count):
            finish(builder.add(first, const(i)), i)

    _asm(builder, "ldtilecfg ($0)", "r", [_ptr(builder, cfg_a, const(0))])
    with cgutils.for_range(builder, builder.udiv(n_act, const(BATCH))) as batch_loop:
        run(builder.mul(batch_loop.index, const(BATCH)), BATCH)
    rest = builder.urem(n_act, const(BATCH))
    with cgutils.for_range(builder, rest) as rest_loop:
        run(builder.add(builder.sub(n_act, rest), rest_loop.index), 1)
    _asm(builder, "tilerelease")
    for t in range(TILE_TOKENS):
        at = builder.add(builder.mul(builder.add(t0, const(t)), out_stride), builder.mul(block, const(16)))
        ptr = builder.bitcast(builder.gep(out_a.data, [at]), v16f.as_pointer())
        builder.store(builder.load(total[t]), ptr, align=4)
    return context.get_dummy_value()


_amx_block = amx_packed_kernel()


@njit(cache=True)
def unpack_block(codes, b, rows):
    """The int4 tiles of row block b as AMX B rows: tile j's low nibbles
    (inputs 8j..8j+3) are row 2j, its high nibbles row 2j+1."""
    src, dst = codes[b].reshape(-1), rows.reshape(-1)
    for j in range(codes.shape[1]):
        for i in range(64):   # vectorised: 64 bytes at a time
            byte = src[64 * j + i]
            dst[128 * j + i] = byte & np.uint8(15)
            dst[128 * j + 64 + i] = byte >> np.uint8(4)


@njit(parallel=True, cache=True)
def gemm_int4_amx(cfg, codes, scales, zeros, offsets, zero, x, out):
    """out (T, out_p) = x_hat (T, in_p) @ W.T, T a multiple of 16: each thread
    takes whole 16-row blocks, unpacks one to bytes (in L2) and runs all
    tokens through it, 16 at a time."""
    check_shapes(codes, scales, x, out, 8)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    for b in prange(codes.shape[0]):
        rows = np.empty((2 * codes.shape[1], 64), np.uint8)
        unpack_block(codes, b, rows)
        cbuf = np.empty((BATCH, 16, 16), np.int32)
        for t0 in range(0, x.shape[0], 16):
            _amx_block(cfg, rows, scales, zeros, offsets, zero, xq, xs, xg, b, t0, cbuf, out)


@njit(parallel=True, cache=True)
def gemm_int8_amx(cfg, codes, scales, zeros, offsets, zero, x, out):
    """The same for int8 codes, whose tiles are AMX B rows as stored."""
    check_shapes(codes, scales, x, out, 4)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    for b in prange(codes.shape[0]):
        cbuf = np.empty((BATCH, 16, 16), np.int32)
        for t0 in range(0, x.shape[0], 16):
            _amx_block(cfg, codes[b], scales, zeros, offsets, zero, xq, xs, xg, b, t0, cbuf, out)


GEMM = {4: gemm_int4_amx, 8: gemm_int8_amx}


def usable(group_size):
    """AMX's A tile holds at most 64 bytes per row: activation groups of 4..64."""
    a = ref.act_group_size(group_size)
    return a % 4 == 0 and a <= 64


# ---------------------------------------------------------------- bf16 weights


def bf16_config():
    """tmm0-3 C: 16 rows x 16 float32; tmm4-5 A: 16 weight rows x 32 bf16;
    tmm6-7 B: 16 rows x (16 tokens x 2 bf16)."""
    return tile_config([(16, 64)] * 8)


@intrinsic
def _amx_bf16_block(typingctx, cfg, w, x_hi, x_lo, tt, cbuf):
    """cbuf[2i + j] = (weight rows 16i .. 16i+16 of w) @ (tokens of tile tt+j).T, i, j
    in {0, 1}: float32 (16 rows x 16 tokens), summing hi and lo parts of the activations.

    w     uint16 (2, in/32, 16, 32): 32 weight rows of bf16 bits as A tiles (`tiles_of_rows`)
    x_hi  uint16 (token tiles, in/2, 32): row kk of tile t holds, for each of
          its 16 tokens, the bf16 of inputs 2kk and 2kk+1 (AMX's VNNI-2 B layout)
    x_lo  the same for x - hi
    cbuf  float32 (4, 16, 16)"""
    check_arrays("amx_bf16_block", [(cfg, types.uint8, 1), (w, types.uint16, 4), (x_hi, types.uint16, 3),
                                    (x_lo, types.uint16, 3), (cbuf, types.float32, 3)])
    sig = types.void(cfg, w, x_hi, x_lo, tt, cbuf)

    def codegen(context, builder, signature, args):
        cfg_a, w_a, hi_a, lo_a, _, cbuf_a = array_args(context, builder, signature, args)
        as_intp, const, dim = index_helpers(context, builder)
        tt = as_intp(args[4])
        k_steps = dim(w_a, 1)
        half_in = builder.mul(k_steps, const(16))
        sixty_four = ir.Constant(I64, 64)
        _asm(builder, "ldtilecfg ($0)", "r", [_ptr(builder, cfg_a, const(0))])
        for i in range(4):
            _asm(builder, f"tilezero %tmm{i}")
        with cgutils.for_range(builder, k_steps) as k_loop:
            kk = k_loop.index
            for i in (0, 1):   # A: 16 weight rows x 32 inputs, 1 KB
                at = builder.mul(builder.add(builder.mul(const(i), k_steps), kk), const(512))
                _asm(builder, f"tileloadd ($0,$1,1), %tmm{4 + i}", "r,r", [_ptr(builder, w_a, at), sixty_four])
            for j in (0, 1):
                for reg, part in ((6, hi_a), (7, lo_a)):
                    at = builder.add(builder.mul(builder.add(tt, const(j)), builder.mul(half_in, const(32))),
                                     builder.mul(kk, const(16 * 32)))
                    _asm(builder, f"tileloadd ($0,$1,1), %tmm{reg}", "r,r", [_ptr(builder, part, at), sixty_four])
                    for i in (0, 1):
                        _asm(builder, f"tdpbf16ps %tmm{reg}, %tmm{4 + i}, %tmm{2 * i + j}")
        for c in range(4):
            _asm(builder, f"tilestored %tmm{c}, ($0,$1,1)", "r,r", [_ptr(builder, cbuf_a, const(256 * c)), sixty_four])
        _asm(builder, "tilerelease")
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def split_bf16_activations(x, x_hi, x_lo):
    """x (T_p, in) float32 -> hi = bf16(x), lo = bf16(x - hi), in AMX's B layout
    (`reference.split_bf16`). x - hi is exact in float32."""
    for t in prange(x.shape[0]):
        tile, col = t // 16, 2 * (t % 16)
        for k in range(x.shape[1]):
            v = x[t, k]
            hi = round_to_bf16(v)
            lo = round_to_bf16(v - bits_to_f32(hi << np.uint32(16)))
            x_hi[tile, k // 2, col + k % 2] = np.uint16(hi)
            x_lo[tile, k // 2, col + k % 2] = np.uint16(lo)


@njit(cache=True)
def tiles_of_rows(w, r0, a):
    """a[i, kk] = w[r0+16i : r0+16i+16, 32kk : 32kk+32]: 32 rows of the checkpoint
    as contiguous 1 KB A tiles. Loading A straight from the rows (16 rows 2*in
    bytes apart) measured ~2x slower: every tile touched 16 pages."""
    for i in range(2):
        for kk in range(a.shape[1]):
            for r in range(16):
                for e in range(32):   # 64 bytes of one row
                    a[i, kk, r, e] = w[r0 + 16 * i + r, 32 * kk + e]


@njit(parallel=True, cache=True)
def gemm_bf16_amx(cfg, w, x, rows, out):
    """out[:, :rows] = x (T_p, in) @ w[:rows].T for `rows` a multiple of 32 and
    T_p of 32: each thread takes pairs of 16-row blocks through all tokens."""
    n_tok, n_in = x.shape
    if (n_in != w.shape[1] or n_in % 32 or n_tok % 32 or rows % 32 or rows > w.shape[0]
            or out.shape[0] != n_tok or out.shape[1] < rows):
        raise ValueError("gemm_bf16_amx: in and tokens must be multiples of 32, out (T_p, >= rows)")
    x_hi = np.empty((n_tok // 16, n_in // 2, 32), np.uint16)
    x_lo = np.empty((n_tok // 16, n_in // 2, 32), np.uint16)
    split_bf16_activations(x, x_hi, x_lo)
    for p in prange(rows // 32):
        cbuf = np.empty((4, 16, 16), np.float32)
        a = np.empty((2, n_in // 32, 16, 32), np.uint16)
        tiles_of_rows(w, 32 * p, a)
        for tt in range(0, n_tok // 16, 2):
            _amx_bf16_block(cfg, a, x_hi, x_lo, tt, cbuf)
            for i in range(2):
                for j in range(2):
                    for r in range(16):
                        for t in range(16):
                            out[16 * (tt + j) + t, 32 * p + 16 * i + r] = cbuf[2 * i + j, r, t]
