"""The K-quant dot product in hand-written LLVM IR: one 16-row block of super-block
records (`reference.kquant_layout`) against 1 or 4 tokens of int8 activations.

Why by hand: for the reason `simd.py` gives (LLVM never selects `vpdpbusd` on its
own), and because this kernel has two levels of scales. Per super-block of 256
inputs and per row it computes, with integers only,

    dot[j]  = sum over sub-block j of c[k] * xq[k]          vpdpbusd, c unsigned
    acc     = sum_j sc[j] * (dot[j] - z * bsum[j])           z: Q6_K's zero code 32
    msum    = sum_j m[j] * bsum[j]                           (Q4_K, Q5_K)

(bsum[j]: the sum of xq over sub-block j, one number per token), then in float32

    out = fma(d,    x_scale * float(acc),  out)
    out = fma(-dmin, x_scale * float(msum), out)             (Q4_K, Q5_K)

once per super-block: the activations have one scale per 256 inputs (as llama.cpp's
Q8_K), so the integer sums of all the sub-blocks can be combined before any float
arithmetic. That is what keeps the two-level scales cheap: the sub-block scales
are integer multiplies (8 rows per `vpmulld`), the float work is two FMAs per 256
inputs. |acc| < 2**28 for every kind (Q6_K: 16 sub-blocks x 128 x 16 x 32 x 127),
so int32 holds it.

Codes: the low nibbles are int4 tiles (`pack_tiles`): an `and` and a shift give two
operands of 8 rows x 4 inputs. Q5_K's fifth bit and Q6_K's bits 4-5 come from a
high tile whose 32-bit lane holds the top bits of the same 4 inputs at the same byte
positions (`reference.pack_high_bits`), so one shift and one `and` put them beside
the nibble: `c = nibble | ((high << (4 - hb * t)) & top)`.

Loops: over the super-blocks of the row block, then over its 8 chunks of 32 inputs
(`reference.kquant_layout`), whose tiles and sub-blocks are unrolled here. The
records of a row block are one sequential stream, read front to back, and the
hardware prefetcher follows it: software prefetches (1-8 KB ahead, one per 64-byte
line, as `simd.packed_block_kernel` issues them) measured no faster on the Zen 4 test
machine, on one thread or two, so there are none. (Unrolling the 8 chunks too gave
the same speed and 8 times the code to compile.)

Numba inlines this into the kernels of `kquant.py` and keys its on-disk cache on
*that* file: after editing this one, delete the cache
(`find kernels -name '*.nb[ic]' -delete`) or the old code keeps running.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import reference as ref
from .simd import (DOT4, F32, I8, I16, I32, _fma, _half_vec_to_f32, _load_vec, _splat, _vec, array_args,
                   check_arrays, index_helpers)


def kquant_block_kernel(n_tok, bits, path):
    """Build the intrinsic that multiplies one 16-row block of a `bits`-bit K-quant
    weight (4: Q4_K, 5: Q5_K, 6: Q6_K) by `n_tok` tokens (1: decode, 4: prefill).
    `path` picks the byte dot product (`simd.DOT4`); every path gives the same bits."""
    dot4 = DOT4[path]

    @intrinsic
    def kquant_block(typingctx, records, xq, x_scale, bsums, block, t0, out):
        """out[t0+t, 16b : 16b+16] = W[those rows] @ x_hat[t0+t] for t < n_tok

        records  uint8   (n_blocks, n_super, record bytes)   (reference.kquant_layout)
        xq       int32   (T, in/4)        int8 activations, four per word
        x_scale  float32 (T, n_super)     one per super-block
        bsums    int32   (T, in/sub_block) sum of xq over each sub-block
        out      float32 (T, out_p)"""
        check_arrays("kquant_block", [(records, types.uint8, 3), (xq, types.int32, 2), (x_scale, types.float32, 2),
                                      (bsums, types.int32, 2), (out, types.float32, 2)])
        sig = types.void(records, xq, x_scale, bsums, block, t0, out)

        def codegen(context, builder, signature, args):
            return _emit_kquant_block(context, builder, signature, args, n_tok, bits, dot4)

        return sig, codegen

    return kquant_block


def _emit_kquant_block(context, builder, signature, args, n_tok, bits, dot4):
    records_a, xq_a, xs_a, bs_a, _, _, out_a = array_args(context, builder, signature, args)
    as_intp, const, dim = index_helpers(context, builder)
    at = ref.kquant_layout(bits)
    sub_block, zero, has_mins = ref.KQUANT_KINDS[bits]
    n_sub = ref.QK_K // sub_block
    hb = bits - 4                        # bits above the nibble: 0, 1 or 2
    per_high = 32 // hb if hb else 0     # inputs per high tile
    record = at["record"]

    block, t0 = as_intp(args[4]), as_intp(args[5])
    n_super = dim(records_a, 1)
    block_at = builder.mul(block, builder.mul(n_super, const(record)))
    xq_stride, xs_stride, bs_stride, out_stride = dim(xq_a, 1), dim(xs_a, 1), dim(bs_a, 1), dim(out_a, 1)

    def token_row(t, stride):  # flat index of row t0+t of a 2-D array
        return builder.mul(builder.add(t0, const(t)), stride)

    v8i32, v8f32, v32i8 = _vec(I32, 8), _vec(F32, 8), _vec(I8, 32)
    zero_i, zero_f = ir.Constant(v8i32, None), ir.Constant(v8f32, None)
    bytes_of = lambda v: ir.Constant(v32i8, [v] * 32)  # noqa: E731
    # Independent add chains hide vpdpbusd's latency: for one token, 2 per 8 rows (the
    # sub-blocks of a super-block are independent too); 4 tokens give 8 chains already.
    # (1, 2 and 4 chains measured within 10 %; 2 was the fastest for every kind.)
    parts = 2 if n_tok == 1 else 1
    total = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(2)] for _ in range(n_tok)]
    for t in range(n_tok):
        for h in range(2):
            builder.store(zero_f, total[t][h])

    def load_rows(base, offset, h, vty):
        """The 8 rows' values for half h (rows 8h..8h+7) of a part of the record."""
        return _load_vec(builder, records_a.data, builder.add(base, const(offset + 8 * h * vty.element.width // 8)), vty)

    def widen_rows(base, offset, h, signed):
        """8 bytes (one per row) -> <8 x i32>."""
        v = load_rows(base, offset, h, _vec(I8, 8))
        return builder.sext(v, v8i32) if signed else builder.zext(v, v8i32)

    def code_operands(chunk_base, tile, h):
        """The two <32 x i8> operands of nibble tile `tile` (0..3) of a chunk (its inputs
        0..3 and 4..7) for rows 8h..8h+7, with their high bits where the kind has them."""
        v = _load_vec(builder, records_a.data, builder.add(chunk_base, const(64 * tile + 32 * h)), v32i8)
        nibbles = [builder.and_(v, bytes_of(15)), builder.lshr(v, bytes_of(4))]
        if not hb:
            return nibbles
        first = 8 * tile                                   # first input of the tile, within the chunk
        high_at = 256 + 64 * (first // per_high)
        high = _load_vec(builder, records_a.data, builder.add(chunk_base, const(high_at + 32 * h)), v32i8)
        top = bytes_of(((1 << hb) - 1) << 4)
        out = []
        for i, nibble in enumerate(nibbles):
            field = (first % per_high) // 4 + i            # which hb-bit field of each byte
            shift = 4 - hb * field
            moved = (builder.shl(high, bytes_of(shift)) if shift > 0 else
                     builder.lshr(high, bytes_of(-shift)) if shift < 0 else high)
            out.append(builder.or_(nibble, builder.and_(moved, top)))
        return out

    subs_per_chunk = 32 // sub_block
    acc = [[cgutils.alloca_once_value(builder, zero_i) for _ in range(2)] for _ in range(n_tok)]
    with cgutils.for_range(builder, n_super) as super_loop:
        s = super_loop.index
        base = builder.add(block_at, builder.mul(s, const(record)))
        for t in range(n_tok):
            for h in range(2):
                builder.store(zero_i, acc[t][h])
        with cgutils.for_range(builder, const(ref.QK_K // 32)) as chunk_loop:   # 8 chunks of 32 inputs
            c = chunk_loop.index
            chunk_base = builder.add(base, builder.add(const(at["chunks"]), builder.mul(c, const(at["chunk"]))))
            for jl in range(subs_per_chunk):
                j = builder.add(builder.mul(c, const(subs_per_chunk)), const(jl))   # sub-block within the super-block
                # Q6_K's zero code: the first chain starts at -z * bsum (sum (c - z) x = sum c x - z sum x)
                start = []
                for t in range(n_tok):
                    b_at = builder.add(token_row(t, bs_stride), builder.add(builder.mul(s, const(n_sub)), j))
                    bsum = builder.load(builder.gep(bs_a.data, [b_at]))
                    start.append(_splat(builder, builder.mul(bsum, ir.Constant(I32, -zero)), 8) if zero else zero_i)
                dots = [[[start[t]] + [zero_i] * (parts - 1) for _ in range(2)] for t in range(n_tok)]
                for u in range(sub_block // 8):
                    tile = jl * (sub_block // 8) + u               # within the chunk
                    operands = [code_operands(chunk_base, tile, h) for h in (0, 1)]
                    for t in range(n_tok):
                        word = builder.add(token_row(t, xq_stride), builder.add(
                            builder.add(builder.mul(s, const(ref.QK_K // 4)), builder.mul(c, const(8))), const(2 * tile)))
                        xw = [builder.bitcast(_splat(builder, builder.load(builder.gep(xq_a.data, [builder.add(word, const(i))])), 8),
                                              v32i8) for i in (0, 1)]
                        for h in (0, 1):
                            for i in (0, 1):
                                slot = (2 * u + i) % parts
                                dots[t][h][slot] = dot4(builder, dots[t][h][slot], operands[h][i], xw[i])
                for h in (0, 1):
                    sc_at = builder.add(base, builder.add(const(at["scales"] + 8 * h), builder.mul(j, const(16))))
                    sc = _load_vec(builder, records_a.data, sc_at, _vec(I8, 8))
                    sc = builder.zext(sc, v8i32) if has_mins else builder.sext(sc, v8i32)
                    for t in range(n_tok):
                        dot = dots[t][h][0]
                        for other in dots[t][h][1:]:
                            dot = builder.add(dot, other)
                        builder.store(builder.add(builder.load(acc[t][h]), builder.mul(sc, dot)), acc[t][h])
        bsum = [[None] * n_sub for _ in range(n_tok)]
        if has_mins:
            for t in range(n_tok):
                for j in range(n_sub):
                    at_j = builder.add(token_row(t, bs_stride), builder.add(builder.mul(s, const(n_sub)), const(j)))
                    bsum[t][j] = builder.load(builder.gep(bs_a.data, [at_j]))
        for h in (0, 1):
            d = _half_vec_to_f32(builder, load_rows(base, at["d"], h, _vec(I16, 8)))
            if has_mins:
                neg_dmin = builder.fsub(ir.Constant(v8f32, [-0.0] * 8),
                                        _half_vec_to_f32(builder, load_rows(base, at["dmin"], h, _vec(I16, 8))))
                mins = [widen_rows(base, at["mins"] + 16 * j, h, signed=False) for j in range(n_sub)]
            for t in range(n_tok):
                x_scale = _splat(builder, builder.load(builder.gep(xs_a.data, [builder.add(token_row(t, xs_stride), s)])), 8)
                value = _fma(builder, d, builder.fmul(x_scale, builder.sitofp(builder.load(acc[t][h]), v8f32)),
                             builder.load(total[t][h]))
                if has_mins:
                    msum = builder.mul(mins[0], _splat(builder, bsum[t][0], 8))
                    for j in range(1, n_sub):
                        msum = builder.add(msum, builder.mul(mins[j], _splat(builder, bsum[t][j], 8)))
                    value = _fma(builder, neg_dmin, builder.fmul(x_scale, builder.sitofp(msum, v8f32)), value)
                builder.store(value, total[t][h])

    for t in range(n_tok):
        for h in (0, 1):
            at_out = builder.add(token_row(t, out_stride), builder.add(builder.mul(block, const(16)), const(8 * h)))
            ptr = builder.bitcast(builder.gep(out_a.data, [at_out]), v8f32.as_pointer())
            builder.store(builder.load(total[t][h]), ptr, align=4)
    return context.get_dummy_value()
