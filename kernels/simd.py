"""Where minislm writes LLVM IR by hand instead of Python: the packed dot products.

Numba compiles Python loops to LLVM IR and lets LLVM vectorise them. That
works for fp32 and bf16 (see `fp32.py`, `bf16.py`), but not for the packed
int4/int8 dot product: LLVM's loop vectoriser keeps one product per 32-bit
lane and never uses the CPU's "multiply 4 pairs of bytes and add them into a
lane" instruction (`vpdpbusd`, AVX-512 VNNI / AVX-VNNI), which does 4
multiply-adds per lane with no shuffles (the tile layout of `packed.py` is
built around it).

So `packed_block_kernel` spells out the vector operations of one 16-row block
of codes against 1 or 4 tokens of int8 activations, with the byte dot product
of the chosen path (`DOT4`): `vpdpbusd` itself, or *portable* LLVM IR (bytes
widened, multiplied, even/odd `shufflevector` + `add`) that x86 lowers to
`pmaddwd` and other backends to their own instructions. The float32 epilogue
(`act_group_epilogue`, `group_epilogue`) is shared with `amx.py`, so every path
returns the same bits. The helpers at the top (`array_args`, `index_helpers`,
`check_arrays`, `emit_prefetch`) are what any hand-written intrinsic here or
in `amx.py` needs from Numba; `lane_block_kernel` is the block both bf16 kernels
with lanes along the inputs emit (`bf16dot.py`, `bf16pairs.py`). Scalar bit-casts live in `scalars.py`.

Numba inlines these into the kernels of `packed.py`, `amx.py`, `bf16dot.py` and
`bf16pairs.py`, and keys
its on-disk cache on the content of *those* files: after editing this one,
delete the cache (`find kernels -name '*.nb[ic]' -delete`) or the old code
keeps running.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


# ---------------------------------------------------------------- what every intrinsic needs


def array_args(context, builder, signature, args):
    """An intrinsic's arguments as Numba array structs (`.data`, `.shape`) where they
    are arrays, None for the others."""
    return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
            for t, a in zip(signature.args, args)]


def index_helpers(context, builder):
    """Index arithmetic in Numba's intp: `as_intp(v)` sign-extends a narrower integer,
    `const(v)` is a constant, `dim(arr, i)` is dimension i of an array struct."""
    intp = context.get_value_type(types.intp)

    def as_intp(v):
        return builder.sext(v, intp) if v.type.width < intp.width else v

    def const(v):
        return ir.Constant(intp, v)

    def dim(arr, i):
        return cgutils.unpack_tuple(builder, arr.shape)[i]

    return as_intp, const, dim


def check_arrays(kernel, expected):
    """Refuse, when Numba types the call, an array the IR would misread (it does no
    bounds or stride checks): each (type, dtype or tuple of dtypes, ndim) in
    `expected` must be a C-contiguous array of that dtype and ndim."""
    for arr, dtypes, ndim in expected:
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if not (isinstance(arr, types.Array) and arr.dtype in dtypes and arr.ndim == ndim and arr.layout == "C"):
            raise errors.TypingError(f"{kernel}: expected a C-contiguous {ndim}-D "
                                     f"{' or '.join(map(str, dtypes))} array, got {arr}")


def group_arrays(scales, zeros, offsets):
    """What `check_arrays` expects of a packed weight's per-group arrays; zeros and
    offsets may be None (one zero code for all, no offsets)."""
    expected = [(scales, (types.uint16, types.float32), 3)]
    if not isinstance(zeros, types.NoneType):
        expected.append((zeros, types.uint8, 3))
    if not isinstance(offsets, types.NoneType):
        expected.append((offsets, types.float32, 3))
    return expected


def emit_prefetch(builder, pointer):
    """Ask the memory system for the cache line at `pointer` (LLVM's prefetch: read,
    keep in all cache levels; a hint, never a fault, even past the end)."""
    i8p = ir.PointerType(I8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(pointer, i8p), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def zeroed_slots(builder, vty, count):
    """`count` stack slots of vector type `vty`, each set to zero where this code runs
    (an accumulator per slot: `alloca_once` puts them in the entry block, so the zeroing
    must be emitted here, where every call of the block starts)."""
    slots = [cgutils.alloca_once(builder, vty) for _ in range(count)]
    for slot in slots:
        builder.store(ir.Constant(vty, None), slot)
    return slots


def for_each_32_words(builder, const, data, row_starts, n_in, step):
    """Call step(k, words) for k = 0, 32, ... below `n_in`: `words` holds, for each row
    starting at the flat indexes `row_starts` of the uint16 array `data`, its 32 words
    k .. k+31 as a <16 x i32> (two bf16 numbers per lane). The last n_in % 32 words of
    a row are copied into a zeroed vector: a full load would read past the row (past
    the array, for the last row), and whatever bits lay there could be NaN, which
    times a zero activation is NaN."""
    v16i, v32i16 = _vec(I32, 16), _vec(I16, 32)
    full = builder.udiv(n_in, const(32))
    with cgutils.for_range(builder, full) as loop:
        k = builder.mul(loop.index, const(32))
        step(k, [_load_vec(builder, data, builder.add(start, k), v16i) for start in row_starts])

    rest = builder.urem(n_in, const(32))
    with builder.if_then(builder.icmp_unsigned("!=", rest, const(0))):
        k = builder.mul(full, const(32))
        tail = cgutils.alloca_once(builder, v32i16)
        words = []
        for start in row_starts:
            builder.store(ir.Constant(v32i16, None), tail)
            lanes = builder.bitcast(tail, I16.as_pointer())
            with cgutils.for_range(builder, rest) as j:
                word = builder.load(builder.gep(data, [builder.add(start, builder.add(k, j.index))]))
                builder.store(word, builder.gep(lanes, [j.index]))
            words.append(builder.load(builder.bitcast(tail, v16i.as_pointer())))
        step(k, words)


def reduce_lanes_together(builder, vectors):
    """Each <16 x float> of `vectors` summed as a fixed tree (8 + 8, 4 + 4, 2 + 2, 1 + 1),
    all at once: two vectors whose lanes belong to owners a and b (L lanes each)
    become one whose first half holds a's L/2 partial sums and the second b's, one
    shuffle pair and one addition for both; a last vector with several lanes per
    owner halves itself. 16 vectors cost 15 additions instead of 60. Returns
    <n x float>, lane i = vectors[i]'s sum (n a power of two, at most 16): the same
    order for any n, so the same bits (`reference.tree_sum_lanes`)."""
    level, lanes = list(vectors), 16
    while lanes > 1:
        half = lanes // 2
        width = level[0].type.count
        owners = width // lanes
        lo = [o * lanes + j for o in range(owners) for j in range(half)]
        hi = [o * lanes + half + j for o in range(owners) for j in range(half)]
        if len(level) > 1:   # two vectors into one of the same width
            pairs = [(a, b, lo + [width + i for i in lo], hi + [width + i for i in hi])
                     for a, b in zip(level[::2], level[1::2])]
        else:                # one vector into one of half its width
            pairs = [(level[0], level[0], lo, hi)]
        level = [builder.fadd(builder.shuffle_vector(a, b, ir.Constant(_vec(I32, len(i)), i)),
                              builder.shuffle_vector(a, b, ir.Constant(_vec(I32, len(j)), j)))
                 for a, b, i, j in pairs]
        lanes = half
    return level[0]


def lane_block_kernel(name, x_dtype, n_rows, n_tok, load_x, multiply_add):
    """The intrinsic `name(w, x, r0, t0, out)` of a bf16 kernel whose 16 lanes run along
    the inputs (`bf16dot.py`, `bf16pairs.py`):

        out[t0+t, r0+r] = w[r0+r] . x[t0+t]      for r < n_rows, t < n_tok

        w    uint16 (out, in)      bf16 weight bits, the checkpoint's rows
        x    x_dtype (T_p, in_p)   the activations as the kernel wants them, in_p = in
                                   rounded up to 32, zeros beyond in
        out  float32 (T_p, out)

    One <16 x float> accumulator per (row, token), over every 32 inputs k:
    `load_x(builder, x_data, at, const)` loads a token's activations k .. k+31 (`at`
    indexes x[t, k]) and `multiply_add(builder, acc, words, xk)` adds a row's 32 weights
    (`words`, <16 x i32>) times them. The accumulators' lanes are then summed by
    `reduce_lanes_together` (n_rows * n_tok a power of two, at most 16), and each
    token's rows stored side by side."""

    @intrinsic
    def lane_block(typingctx, w, x, r0, t0, out):
        check_arrays(name, [(w, types.uint16, 2), (x, x_dtype, 2), (out, types.float32, 2)])
        sig = types.void(w, x, r0, t0, out)

        def codegen(context, builder, signature, args):
            w_a, x_a, _, _, out_a = array_args(context, builder, signature, args)
            as_intp, const, dim = index_helpers(context, builder)
            r0, t0 = as_intp(args[2]), as_intp(args[3])
            n_in, x_stride, out_stride = dim(w_a, 1), dim(x_a, 1), dim(out_a, 1)
            acc = zeroed_slots(builder, _vec(F32, 16), n_tok * n_rows)   # token-major: acc[t * n_rows + r]
            w_row = [builder.mul(builder.add(r0, const(r)), n_in) for r in range(n_rows)]
            x_row = [builder.mul(builder.add(t0, const(t)), x_stride) for t in range(n_tok)]

            def step(k, words):
                for t in range(n_tok):
                    xk = load_x(builder, x_a.data, builder.add(x_row[t], k), const)
                    for r in range(n_rows):
                        slot = acc[t * n_rows + r]
                        builder.store(multiply_add(builder, builder.load(slot), words[r], xk), slot)

            for_each_32_words(builder, const, w_a.data, w_row, n_in, step)
            sums = reduce_lanes_together(builder, [builder.load(slot) for slot in acc])
            for t in range(n_tok):
                at = builder.gep(out_a.data, [builder.add(builder.mul(builder.add(t0, const(t)), out_stride), r0)])
                if n_rows == 1:
                    builder.store(builder.extract_element(sums, ir.Constant(I32, t)), at)
                else:
                    row = builder.shuffle_vector(sums, sums, ir.Constant(_vec(I32, n_rows), list(range(t * n_rows, (t + 1) * n_rows))))
                    builder.store(row, builder.bitcast(at, _vec(F32, n_rows).as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return lane_block


# ---------------------------------------------------------------- vector pieces


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


def _half_vec_to_f32(builder, words):
    """<n x i16> float16 bit patterns -> <n x float> (`vcvtph2ps` with F16C)."""
    n = words.type.count
    return builder.fpext(builder.bitcast(words, _vec(ir.HalfType(), n)), _vec(F32, n))


def _dot4_vnni(builder, acc, a, b):
    """acc <8 x i32> + per lane sum of 4 products unsigned a[i] * signed b[i]:
    one `vpdpbusd` (AVX-512 VNNI / AVX-VNNI)."""
    v8 = _vec(I32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                        "llvm.x86.avx512.vpdpbusd.256")
    return builder.call(fn, [acc, builder.bitcast(a, v8), builder.bitcast(b, v8)])


def _dot4_portable(builder, acc, a, b):
    """The same sums in generic IR: bytes widened to int16, pairs multiplied
    and added into int32 (x86 selects `pmaddwd`), then neighbouring pairs added."""
    v32 = _vec(I32, 32)
    prod = builder.mul(builder.zext(a, v32), builder.sext(b, v32))     # (32,) exact
    even = ir.Constant(_vec(I32, 16), list(range(0, 32, 2)))
    odd = ir.Constant(_vec(I32, 16), list(range(1, 32, 2)))
    pairs = builder.add(builder.shuffle_vector(prod, prod, even), builder.shuffle_vector(prod, prod, odd))
    even8 = ir.Constant(_vec(I32, 8), list(range(0, 16, 2)))
    odd8 = ir.Constant(_vec(I32, 8), list(range(1, 16, 2)))
    quads = builder.add(builder.shuffle_vector(pairs, pairs, even8), builder.shuffle_vector(pairs, pairs, odd8))
    return builder.add(acc, quads)


DOT4 = {"vnni": _dot4_vnni, "portable": _dot4_portable}


def _fma(builder, a, b, c):
    """a * b + c rounded once (`llvm.fma`: the same result on every CPU)."""
    name = f"llvm.fma.v{a.type.count}f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


def group_scale_and_offset(builder, scales_a, zeros_a, offsets_a, zero, at, n, f16_scales):
    """The `n` rows' scale s and c = b - s * z of one group (vectors of float32);
    `at` indexes the first row in the (blocks, groups, 16) arrays."""
    if f16_scales:
        s = _half_vec_to_f32(builder, _load_vec(builder, scales_a.data, at, _vec(I16, n)))
    else:
        s = _load_vec(builder, scales_a.data, at, _vec(F32, n))
    if zeros_a is None:
        z = _splat(builder, zero, n)
    else:
        z = builder.uitofp(_load_vec(builder, zeros_a.data, at, _vec(I8, n)), _vec(F32, n))
    sz = builder.fmul(s, z)
    if offsets_a is None:
        return s, builder.fsub(ir.Constant(_vec(F32, n), [-0.0] * n), sz)   # -(s*z), exactly
    return s, builder.fsub(_load_vec(builder, offsets_a.data, at, _vec(F32, n)), sz)


def act_group_epilogue(builder, s, x_scale, isum, total):
    """total + s * (x_scale * isum), the product in brackets rounded, then one
    fused multiply-add: what every path adds per activation group (s: the rows'
    scales, x_scale: the token's, isum: the exact integer dot products, one per
    row). The tiny weight scale comes last, so a subnormal one is not amplified."""
    n = s.type.count
    return _fma(builder, s, builder.fmul(_splat(builder, x_scale, n), builder.sitofp(isum, _vec(F32, n))), total)


def group_epilogue(builder, c, x_gsum, total):
    """total + c * x_gsum (c = b - s * z): the zero code and offset of a weight
    group, applied once after its activation groups."""
    return _fma(builder, c, x_gsum, total)


def packed_block_kernel(n_tok, bits, path, prefetch=4096):
    """Build the intrinsic that multiplies one 16-row block of packed weights
    (`bits` = 4 or 8 bits per code) by `n_tok` tokens of int8 activations.

    n_tok = 1 is the decode GEMV; 4 the prefill GEMM, where each unpacked tile
    feeds 4 tokens before the next is loaded. `path` picks the byte dot product
    (`DOT4`); the integer sums are exact, so every path returns the same bits.
    `prefetch`: bytes of codes requested ahead of the current tile. The
    hardware prefetcher alone kept too few requests in flight for one thread
    to stream at its full rate (docs/kernels.md)."""
    dot4 = DOT4[path]

    @intrinsic
    def packed_block(typingctx, codes, scales, zeros, offsets, zero, xq, x_scale, x_gsum, block, t0, out):
        """out[t0+t, 16b : 16b+16] = W[those rows] @ x_hat[t0+t] for t < n_tok

        codes    uint8  (n_blocks, n_tiles, 64)  tiles (reference.pack_tiles)
        scales   uint16 (float16 bits) or float32 (n_blocks, n_groups, 16)
        zeros    uint8  (n_blocks, n_groups, 16) zero codes, or None: `zero` for all
        offsets  float32 (n_blocks, n_groups, 16), or None: b = 0
        xq       int32  (T, in_p/4)   int8 activations, four per word
        x_scale  float32 (T, n_act)   one per activation group
        x_gsum   float32 (T, n_groups) sum of x_hat over each weight group
        out      float32 (T, out_p)

        Per activation group a of weight group g: isum[row] = sum_k c[row, k] * xq[k]
        (exact int32), out[row] = fma(s, x_scale[a] * isum[row], out[row]); after
        the group's last: out[row] = fma(b - s * z, x_gsum[g], out[row])."""
        check_arrays("packed_block", [(codes, types.uint8, 3), (xq, types.int32, 2), (x_scale, types.float32, 2),
                                      (x_gsum, types.float32, 2), (out, types.float32, 2)]
                     + group_arrays(scales, zeros, offsets))
        sig = types.void(codes, scales, zeros, offsets, types.float32, xq, x_scale, x_gsum,
                         block, t0, out)

        def codegen(context, builder, signature, args):
            return _emit_packed_block(context, builder, signature, args, n_tok, bits, dot4, prefetch)

        return sig, codegen

    return packed_block


def _emit_packed_block(context, builder, signature, args, n_tok, bits, dot4, prefetch):
    arrays = array_args(context, builder, signature, args)
    codes_a, scales_a, zeros_a, offsets_a = arrays[:4]
    xq_a, xs_a, xg_a, out_a = arrays[5], arrays[6], arrays[7], arrays[10]
    f16_scales = signature.args[1].dtype == types.uint16
    as_intp, const, dim = index_helpers(context, builder)

    block, t0 = as_intp(args[8]), as_intp(args[9])
    n_tiles, n_groups, n_act = dim(codes_a, 1), dim(scales_a, 1), dim(xs_a, 1)
    tiles_per_act = builder.udiv(n_tiles, n_act)
    acts_per_group = builder.udiv(n_act, n_groups)
    codes_base = builder.mul(block, builder.mul(n_tiles, const(64)))
    sz_base = builder.mul(block, builder.mul(n_groups, const(16)))
    xq_stride, out_stride = dim(xq_a, 1), dim(out_a, 1)

    def token_row(t, stride):  # flat index of row t0+t of a 2-D array
        return builder.mul(builder.add(t0, const(t)), stride)

    v8i32, v8f32, v32i8 = _vec(I32, 8), _vec(F32, 8), _vec(I8, 32)
    zero_i, zero_f = ir.Constant(v8i32, None), ir.Constant(v8f32, None)
    # Independent add chains hide vpdpbusd's latency (5 cycles): for one token,
    # 4 chains per half (int4: 2 tiles x low/high nibbles; int8: 4 tiles), so an
    # activation group of 32 inputs is 1-2 instructions deep; 4 tokens have 8 already.
    words = 2 if bits == 4 else 1                  # activation words per tile
    unroll = (2 if bits == 4 else 4) if n_tok == 1 else 1
    parts = unroll * words if n_tok == 1 else 1
    iacc = [[[cgutils.alloca_once_value(builder, zero_i) for _ in range(parts)] for _ in range(2)]
            for _ in range(n_tok)]
    total = [[cgutils.alloca_once_value(builder, zero_f) for _ in range(2)] for _ in range(n_tok)]
    for t in range(n_tok):
        for h in range(2):
            builder.store(zero_f, total[t][h])
    low_nibble = ir.Constant(v32i8, [15] * 32)
    four = ir.Constant(v32i8, [4] * 32)

    def emit_tile(tile, part):
        tile_at = builder.add(codes_base, builder.mul(tile, const(64)))
        if prefetch:
            emit_prefetch(builder, builder.gep(codes_a.data, [builder.add(tile_at, const(prefetch))]))
        halves = [_load_vec(builder, codes_a.data, builder.add(tile_at, const(32 * h)), v32i8)
                  for h in (0, 1)]   # rows 0-7, rows 8-15: one row per 32-bit lane
        if bits == 4:
            operands = [[(builder.and_(v, low_nibble), 0), (builder.lshr(v, four), 1)] for v in halves]
        else:
            operands = [[(v, 0)] for v in halves]
        for t in range(n_tok):
            at = builder.add(token_row(t, xq_stride), builder.mul(tile, const(words)))
            xw = [builder.bitcast(_splat(builder, builder.load(builder.gep(xq_a.data, [builder.add(at, const(i))])), 8),
                                  v32i8) for i in range(words)]
            for h in (0, 1):
                for w, i in operands[h]:
                    slot = iacc[t][h][(part * words + i) % parts]
                    builder.store(dot4(builder, builder.load(slot), w, xw[i]), slot)

    with cgutils.for_range(builder, n_groups) as group_loop:
        g = group_loop.index
        sc = [group_scale_and_offset(builder, scales_a, zeros_a, offsets_a, args[4],
                                     builder.add(sz_base, builder.add(builder.mul(g, const(16)), const(8 * h))),
                                     8, f16_scales) for h in (0, 1)]
        with cgutils.for_range(builder, acts_per_group) as act_loop:
            a = builder.add(builder.mul(g, acts_per_group), act_loop.index)
            for t in range(n_tok):
                for h in range(2):
                    for slot in iacc[t][h]:
                        builder.store(zero_i, slot)
            first = builder.mul(a, tiles_per_act)
            with cgutils.for_range(builder, builder.udiv(tiles_per_act, const(unroll))) as tile_loop:
                for u in range(unroll):
                    emit_tile(builder.add(first, builder.add(builder.mul(tile_loop.index, const(unroll)), const(u))), u)
            if unroll > 1:   # an odd tile left over
                rest = builder.urem(tiles_per_act, const(unroll))
                with cgutils.for_range(builder, rest) as rest_loop:
                    emit_tile(builder.add(first, builder.add(builder.sub(tiles_per_act, rest), rest_loop.index)), 0)
            for t in range(n_tok):
                x_scale = builder.load(builder.gep(xs_a.data, [builder.add(token_row(t, n_act), a)]))
                for h in range(2):
                    isum = builder.load(iacc[t][h][0])
                    for slot in iacc[t][h][1:]:
                        isum = builder.add(isum, builder.load(slot))
                    builder.store(act_group_epilogue(builder, sc[h][0], x_scale, isum, builder.load(total[t][h])),
                                  total[t][h])
        for t in range(n_tok):
            x_gsum = _splat(builder, builder.load(builder.gep(xg_a.data, [builder.add(token_row(t, n_groups), g)])), 8)
            for h in (0, 1):
                builder.store(group_epilogue(builder, sc[h][1], x_gsum, builder.load(total[t][h])), total[t][h])

    for t in range(n_tok):
        for h in (0, 1):
            at = builder.add(token_row(t, out_stride), builder.add(builder.mul(block, const(16)), const(8 * h)))
            ptr = builder.bitcast(builder.gep(out_a.data, [at]), v8f32.as_pointer())
            builder.store(builder.load(total[t][h]), ptr, align=4)
    return context.get_dummy_value()
