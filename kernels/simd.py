"""Where minislm writes LLVM IR by hand instead of Python.

Numba compiles Python loops to LLVM IR and lets LLVM vectorise them. That
works for fp32 and bf16 (see `fp32.py`, `bf16.py`), but not for the int4
dot product: LLVM's loop vectoriser keeps one product per 32-bit lane and
never uses the CPU's "multiply pairs of int16 and add them" instruction
(x86 `pmaddwd`, or `vpdpwssd` with AVX-512/AVX VNNI; `smull`+`addp` on ARM),
which does two multiply-adds per lane. Measured on the project machine: the
best plain-Numba int4 GEMV sustains ~17 G weights/s per core, the IR below
~38 G weights/s, enough to make int4 GEMV memory-bound.

So `int4_block_gemv` (one token) and `int4_block_gemm4` (four tokens per
pass over a block, for prefill) spell out the vector operations in
*portable* LLVM IR (no x86 intrinsic): `sext`, `mul`, and an even/odd
`shufflevector` + `add`.
LLVM's x86 backend recognises that pattern as `pmaddwd`, fuses the following
add into `vpdpwssd` when the CPU has VNNI, and other backends lower it to
their own instructions. Numba inlines it into the calling kernel.

`bf16_to_f32` is the other place: a bf16 number is the top half of an fp32
number, so widening is `(bits << 16)` reinterpreted as float. Numba has no
scalar bit-cast; this three-instruction intrinsic is one, and LLVM
vectorises the loops that call it. `f32_to_bits` is the reverse bit-cast.

Numba inlines these into the kernels of `int4.py` and `bf16.py`, and keys
its on-disk cache on the content of *those* files: after editing this one,
delete the cache (`find kernels -name '*.nb[ic]' -delete`) or the old code
keeps running.
"""

from llvmlite import ir
from numba import types
from numba.core import errors
from numba.extending import intrinsic
from numba.core import cgutils

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
ROWS = 16  # output rows per tile: one int32 lane per row, in two 8-lane vectors


@intrinsic
def bf16_to_f32(typingctx, bits):
    """float32 whose top 16 bits are `bits` (uint16) and low 16 bits are zero."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], I32), ir.Constant(I32, 16))
        return builder.bitcast(wide, F32)

    return sig, codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """The uint32 bit pattern of a float32 (a bit-cast, not a conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], I32)

    return sig, codegen


def _vec(elem, n):
    return ir.VectorType(elem, n)


def _load_vec(builder, base, index, vty):
    """Load `vty` from `&base[index]` (unaligned)."""
    ptr = builder.bitcast(builder.gep(base, [index]), vty.as_pointer())
    return builder.load(ptr, align=1)


def _splat(builder, scalar, n):
    vty = _vec(scalar.type, n)
    one = builder.insert_element(ir.Constant(vty, None), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, None), ir.Constant(_vec(I32, n), [0] * n))


def _dot_pairs(builder, a, b):
    """<16 x i16> a, b -> <8 x i32>: lane i = a[2i]*b[2i] + a[2i+1]*b[2i+1].

    Written with generic IR; x86 selects `pmaddwd` / `vpdpwssd` for it."""
    wide = _vec(I32, 16)
    prod = builder.mul(builder.sext(a, wide), builder.sext(b, wide))
    even = ir.Constant(_vec(I32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(_vec(I32, 8), list(range(1, 16, 2)))
    return builder.add(builder.shuffle_vector(prod, prod, even),
                       builder.shuffle_vector(prod, prod, odd))


def _bf16_vec_to_f32(builder, words):
    """<8 x i16> raw bf16 words -> <8 x float>."""
    wide = builder.shl(builder.zext(words, _vec(I32, 8)), ir.Constant(_vec(I32, 8), [16] * 8))
    return builder.bitcast(wide, _vec(F32, 8))


def _int4_block_kernel(n_tok, prefetch=4096):
    """Build the intrinsic for one 16-row block and `n_tok` tokens at once.

    n_tok = 1 is the decode GEMV; n_tok = 4 is the prefill GEMM, where each
    unpacked tile of weights feeds 4 tokens before the next is loaded.

    `prefetch`: bytes ahead of the current tile to request from memory. The
    hardware prefetcher alone left one thread at ~9 GB/s streaming int4
    tiles; asking 4 KB ahead (a few microseconds of work) lifted it to ~14,
    the same thread's plain streaming rate (docs/kernels.md)."""

    @intrinsic
    def int4_block(typingctx, qweight, scales, zeros, x_pairs, x_scale, x_sum, block, t0, out):
        """out[t0+t, 16b : 16b+16] = W_hat[those rows] @ x_hat[t0+t] for t < n_tok

        qweight  uint8  (n_blocks, in/4, 32)  tile j of block b: byte 2r+e holds
                                              q[16b+r, 4j+e] | q[16b+r, 4j+2+e] << 4
        scales   uint16 (n_blocks, n_groups, 16)  bf16 bits of d[row, group]
        zeros    uint8  (n_blocks, n_groups, 16)  zero point z, or None: z = 8
        x_pairs  int32  (T, in/2)  int16 activations xq, read two at a time
        x_scale, x_sum  float32 (T, n_groups); x_sum = x_scale * sum(xq in group)
        out      float32 (T, out_p)

        Per group: isum[row] = sum_k q[row,k]*xq[k] in exact int32 arithmetic,
        then out[row] += d * (x_scale*isum - z*x_sum) = sum_k (q-z)*d*x_hat[k].
        """
        symmetric = isinstance(zeros, types.NoneType)
        expected = [(qweight, types.uint8, 3), (scales, types.uint16, 3), (x_pairs, types.int32, 2),
                    (x_scale, types.float32, 2), (x_sum, types.float32, 2), (out, types.float32, 2)]
        if not symmetric:
            expected.append((zeros, types.uint8, 3))
        for arr, dtype, ndim in expected:  # the IR below assumes exactly these
            if not (isinstance(arr, types.Array) and arr.dtype == dtype and arr.ndim == ndim
                    and arr.layout == "C"):
                raise errors.TypingError(f"int4_block: expected a C-contiguous {ndim}-D {dtype} "
                                         f"array, got {arr}")
        sig = types.void(qweight, scales, zeros, x_pairs, x_scale, x_sum, block, t0, out)

        def codegen(context, builder, signature, args):
            return _emit_int4_block(context, builder, signature, args, n_tok, symmetric, prefetch)

        return sig, codegen

    return int4_block


def _emit_int4_block(context, builder, signature, args, n_tok, symmetric, prefetch):
    arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
              for t, a in zip(signature.args, args)]
    q_ptr, d_ptr, z_arr, xp_arr, xs_arr, xsum_arr = arrays[:6]
    out_arr = arrays[8]
    intp = context.get_value_type(types.intp)

    def as_intp(v):
        return builder.sext(v, intp) if v.type.width < intp.width else v

    def const(v):
        return ir.Constant(intp, v)

    def dim(arr, i):
        return cgutils.unpack_tuple(builder, arr.shape)[i]

    block, t0 = as_intp(args[6]), as_intp(args[7])
    n_tiles, n_groups = dim(q_ptr, 1), dim(d_ptr, 1)
    tiles_per_group = builder.udiv(n_tiles, n_groups)
    q_base = builder.mul(block, builder.mul(n_tiles, const(32)))
    dz_base = builder.mul(block, builder.mul(n_groups, const(ROWS)))
    half_in, out_stride = dim(xp_arr, 1), dim(out_arr, 1)

    def row_of(arr, stride, t):  # flat index of row t0+t of a 2-D array
        return builder.mul(builder.add(t0, const(t)), stride)

    v8i32, v8f32, v16i16 = _vec(I32, 8), _vec(F32, 8), _vec(I16, 16)
    zero_i, zero_f = ir.Constant(v8i32, None), ir.Constant(v8f32, None)
    # One accumulator per (token, half); for a single token also split low
    # and high nibbles, so four independent add chains hide vpdpwssd latency.
    parts = 2 if n_tok == 1 else 1
    acc = [[[cgutils.alloca_once_value(builder, zero_i) for _ in range(parts)]
            for _ in range(2)] for _ in range(n_tok)]
    total = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(2)] for _ in range(n_tok)]
    for t in range(n_tok):
        for h in range(2):
            builder.store(zero_f, total[t][h])
    low_mask = ir.Constant(v16i16, [15] * 16)
    four = ir.Constant(v16i16, [4] * 16)
    halves = [ir.Constant(_vec(I32, 16), list(range(h * 16, h * 16 + 16))) for h in (0, 1)]
    undef32 = ir.Constant(_vec(I8, 32), None)

    with cgutils.for_range(builder, n_groups) as group_loop:
        g = group_loop.index
        for t in range(n_tok):
            for h in range(2):
                for a in acc[t][h]:
                    builder.store(zero_i, a)
        with cgutils.for_range(builder, tiles_per_group) as tile_loop:
            tile = builder.add(builder.mul(g, tiles_per_group), tile_loop.index)
            tile_at = builder.add(q_base, builder.mul(tile, const(32)))
            raw = _load_vec(builder, q_ptr.data, tile_at, _vec(I8, 32))
            if prefetch:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                    ir.VoidType(), [ir.PointerType(I8), I32, I32, I32]), "llvm.prefetch.p0")
                ahead = builder.gep(q_ptr.data, [builder.add(tile_at, const(prefetch))])
                builder.call(fn, [builder.bitcast(ahead, ir.PointerType(I8)), ir.Constant(I32, 0),
                                  ir.Constant(I32, 3), ir.Constant(I32, 1)])
            nibbles = []
            for h in (0, 1):  # rows 0-7, rows 8-15
                wide = builder.zext(builder.shuffle_vector(raw, undef32, halves[h]), v16i16)
                nibbles.append((builder.and_(wide, low_mask), builder.lshr(wide, four)))
            for t in range(n_tok):
                at = builder.add(row_of(xp_arr, half_in, t), builder.mul(tile, const(2)))
                x01 = builder.load(builder.gep(xp_arr.data, [at]))
                x23 = builder.load(builder.gep(xp_arr.data, [builder.add(at, const(1))]))
                x01 = builder.bitcast(_splat(builder, x01, 8), v16i16)  # (x0,x1) in every lane
                x23 = builder.bitcast(_splat(builder, x23, 8), v16i16)
                for h in (0, 1):
                    low, high = nibbles[h]
                    a_lo, a_hi = acc[t][h][0], acc[t][h][-1]
                    builder.store(builder.add(builder.load(a_lo), _dot_pairs(builder, low, x01)), a_lo)
                    builder.store(builder.add(builder.load(a_hi), _dot_pairs(builder, high, x23)), a_hi)

        for h in (0, 1):
            at = builder.add(dz_base, builder.add(builder.mul(g, const(ROWS)), const(8 * h)))
            d = _bf16_vec_to_f32(builder, _load_vec(builder, d_ptr.data, at, _vec(I16, 8)))
            if symmetric:
                z = ir.Constant(v8f32, [8.0] * 8)
            else:
                z = builder.uitofp(_load_vec(builder, z_arr.data, at, _vec(I8, 8)), v8f32)
            for t in range(n_tok):
                g_at = builder.add(row_of(xs_arr, n_groups, t), g)
                x_scale = _splat(builder, builder.load(builder.gep(xs_arr.data, [g_at])), 8)
                x_sum = _splat(builder, builder.load(builder.gep(xsum_arr.data, [g_at])), 8)
                isum = builder.load(acc[t][h][0])
                if parts == 2:
                    isum = builder.add(isum, builder.load(acc[t][h][1]))
                part = builder.fsub(builder.fmul(x_scale, builder.sitofp(isum, v8f32)),
                                    builder.fmul(z, x_sum))
                builder.store(builder.fadd(builder.load(total[t][h]), builder.fmul(d, part)),
                              total[t][h])

    for t in range(n_tok):
        for h in (0, 1):
            at = builder.add(row_of(out_arr, out_stride, t),
                             builder.add(builder.mul(block, const(ROWS)), const(8 * h)))
            ptr = builder.bitcast(builder.gep(out_arr.data, [at]), v8f32.as_pointer())
            builder.store(builder.load(total[t][h]), ptr, align=4)
    return context.get_dummy_value()


int4_block_gemv = _int4_block_kernel(1)
int4_block_gemm4 = _int4_block_kernel(4)
