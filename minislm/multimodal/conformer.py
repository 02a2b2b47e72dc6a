"""The speech encoder of Phi-4-multimodal: a Conformer, in NumPy, top to bottom.

    log-mel features (T, 80)
      -> (x - global_mean) * global_invstd, per mel bin
      -> subsampling x8: three 3x3 convolutions of stride 2 over (time, mel),
         the first full, the others depthwise + pointwise, each followed by ReLU
                                                            (T/8, channels x 10)
      -> Linear to the width D                              (T', D)
      -> cut into chunks of at most 500 frames, each encoded on its own
      -> N blocks (macaron order):
             x += 1/2 FF(x)                  a feed-forward half-step
             x += attention(LN(x))           with a learned bias per distance and head
             x += conv(x)                    GLU, causal depthwise conv, pointwise
             x += 1/2 FF(x)                  the other half-step
             x = LN(x)
                                                            (T', D): one vector per 80 ms

Convolution catches what is local in sound (a formant's shape over a few frames),
attention what is far apart; the two feed-forward halves sandwich them ("macaron").
Instead of positions added to the input, each attention head adds a learned number
to every score that depends only on the distance j - i, clipped to +-500 frames
(`relative_bias`).

transformers' Phi4MultimodalAudioModel adds the "mask" to the scores as
`bool + bias`: every allowed pair gets +1, a constant that softmax ignores; minislm
adds it too, so the float32 rounding matches.

Shapes: T = mel frames, T' = ceil(T / 8) encoder frames, D = 1024, heads 16 of 64,
F = 1536, Cc = 1024 subsampling channels.
"""

import numpy as np

from ..kernels import get_threads
from ..kernels.conv import conv3x3_stride2, conv_relu_then_depthwise
from ..kernels.threads import on_python_threads, row_bands
from ..model import NO_TRACE, layer_norm, linear, softmax
from .config import CONFORMER, ConformerConfig

MAX_CHUNK = 500  # the reference's max_seq_len: longer sequences are encoded in independent chunks
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which every norm of the encoder keeps


def swish(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) (SiLU), the sigmoid via tanh so large |x| cannot overflow."""
    return x * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x))


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0), in place (x is always a fresh product here)."""
    return np.maximum(x, np.float32(0), out=x)


# ---------------------------------------------------------------- subsampling


def taps_of(weight: np.ndarray) -> np.ndarray:
    """A (C, 1, 3, 3) filter bank as the kernels take it: (9, C), taps in (dy, dx) order."""
    return np.ascontiguousarray(np.asarray(weight, dtype=np.float32).reshape(len(weight), 9).T)


def conv_stride2(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A depthwise 3x3 convolution with stride 2 and padding 1 over (time, mel), channels
    last: x (H, W, C) -> (ceil(H/2), ceil(W/2), C), each channel filtered on its own
    (weight (C, 1, 3, 3))."""
    H, W, C = x.shape
    x, taps, bias = np.ascontiguousarray(x, dtype=np.float32), taps_of(weight), np.asarray(bias, np.float32)
    out = np.empty(((H + 1) // 2, (W + 1) // 2, C), dtype=np.float32)
    on_row_bands(lambda lo, hi: conv3x3_stride2(x, taps, bias, False, out, lo, hi), len(out))
    return out


def first_convolutions(w: dict, features: np.ndarray, depthwise: bool) -> np.ndarray:
    """conv.0 (the one-channel spectrogram filtered by each of the Cc output channels,
    3x3, stride 2) and its ReLU: (T, 80) -> (T/2, 40, Cc), channels last; with
    `depthwise`, then also stage 1's depthwise conv.2 -> (T/4, 20, Cc), in one kernel
    that never holds the (T/2, 40, Cc) map (82 MB for 10 s of speech)."""
    p = CONFORMER + "embed.conv."
    x = np.ascontiguousarray(features, dtype=np.float32)[:, :, None]  # (T, 80, 1)
    H, W, C = (len(x) + 1) // 2, (x.shape[1] + 1) // 2, len(w[p + "0.weight"])
    taps0, bias0 = taps_of(w[p + "0.weight"]), np.asarray(w[p + "0.bias"], np.float32)
    if not depthwise:
        out = np.empty((H, W, C), dtype=np.float32)
        on_row_bands(lambda lo, hi: conv3x3_stride2(x, taps0, bias0, True, out, lo, hi), len(out))
        return out
    taps2, bias2 = taps_of(w[p + "2.weight"]), np.asarray(w[p + "2.bias"], np.float32)
    out = np.empty(((H + 1) // 2, (W + 1) // 2, C), dtype=np.float32)
    on_row_bands(lambda lo, hi: conv_relu_then_depthwise(x, taps0, bias0, taps2, bias2, out, lo, hi), len(out))
    return out


def on_row_bands(work, n_rows: int) -> None:
    """work(lo, hi) for one band [lo, hi) of the n_rows output rows per thread."""
    bands = row_bands(n_rows, max(1, min(get_threads(), n_rows)))
    on_python_threads(lambda b: work(*bands[b]), len(bands))


def channel_matrix(weight):
    """A 1x1 convolution's kernel, (out, in, 1) or (out, in, 1, 1), as the (out, in)
    matrix `linear` multiplies by; a packed one (bf16 x bf16, `--encoder-activations
    bf16`) already is that matrix."""
    return weight.reshape(len(weight), -1) if isinstance(weight, np.ndarray) else weight


def pointwise(x: np.ndarray, weight, bias: np.ndarray) -> np.ndarray:
    """A 1x1 convolution: (H, W, Cin) -> (H, W, Cout), a matrix over the channels."""
    H, W, C = x.shape
    return linear(x.reshape(H * W, C), channel_matrix(weight), bias).reshape(H, W, -1)


def subsample_block(config: ConformerConfig, w: dict, features: np.ndarray) -> np.ndarray:
    """(T, 80) normalised features -> (ceil(T/8), Cc * 10): the conv stack over
    channels-last maps, then channels and remaining mel bins flattened channel-major
    (index c * 10 + f, as the reference flattens its (Cc, T, F) maps).

    conv.0 + ReLU, then per stage a depthwise conv (conv.2, conv.5) and a pointwise one
    (conv.3, conv.6) + ReLU; conv.0 and conv.2 run as one kernel (`first_convolutions`)."""
    p = CONFORMER + "embed.conv."
    x = first_convolutions(w, features, depthwise=config.stages > 1)  # (T/4, 20, Cc): conv.0, ReLU, conv.2
    for stage in range(1, config.stages):
        dw, pw = 3 * stage - 1, 3 * stage  # conv.2 + conv.3, conv.5 + conv.6
        if stage > 1:  # stage 1's depthwise conv ran in first_convolutions
            x = conv_stride2(x, w[f"{p}{dw}.weight"], w[f"{p}{dw}.bias"])
        x = relu(pointwise(x, w[f"{p}{pw}.weight"], w[f"{p}{pw}.bias"]))
    Tq, F, Cc = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(Tq, Cc * F)


def subsample(config: ConformerConfig, w: dict, features: np.ndarray, block: int = 256) -> np.ndarray:
    """(T, 80) -> (T', D), T' = ceil(T / 8), `block` output frames at a time.

    Output frame k sees input frames 8k-7 .. 8k+7 only, so a block of outputs needs
    its own stretch of input plus 8 frames either side; starting each stretch at a
    multiple of 8 keeps every stride aligned, and the zero padding of the convolutions
    then falls exactly where the whole sequence has it. A 30-minute recording thus
    never holds its full first feature map (1024 channels x 90,000 x 40 floats).
    """
    T = len(features)
    n_out = -(-T // config.time_reduction)
    r = config.time_reduction
    rows = []
    for a in range(0, n_out, block):
        b = min(a + block, n_out)
        start, stop = max(r * a - r, 0), min(r * b + r, T)
        chunk = subsample_block(config, w, features[start:stop])  # local output k = global k - start / 8
        rows.append(chunk[a - start // r : b - start // r])
    flat = np.concatenate(rows)
    return linear(flat, w[CONFORMER + "embed.out.weight"], w[CONFORMER + "embed.out.bias"])  # (T', D)


# ---------------------------------------------------------------- the blocks


def relative_bias(config: ConformerConfig, w: dict, length: int) -> np.ndarray:
    """(heads, L, L): the learned bias of each head for key j seen from query i, one
    table row per distance j - i, clipped to [-M, M - 1] (M = bias_max_distance)."""
    M = config.bias_max_distance
    table = np.asarray(w[CONFORMER + "relative_attention_bias_layer.bias_values.weight"], dtype=np.float32)  # (2M, heads)
    distance = np.arange(length)[None, :] - np.arange(length)[:, None]  # (L, L): j - i
    return np.ascontiguousarray(table[np.clip(distance, -M, M - 1) + M].transpose(2, 0, 1))


def feed_forward(w: dict, name: str, x: np.ndarray) -> np.ndarray:
    """down(value * swish(gate)), [value | gate] = gate_up(LN(x)): the FIRST half is the
    value and the second the gate (the decoder's MLP has them the other way round)."""
    h = layer_norm(x, w[name + "layer_norm.weight"], w[name + "layer_norm.bias"], LN_EPS)
    value, gate = np.split(linear(h, w[name + "net.0.linear.weight"], w[name + "net.0.linear.bias"]), 2, axis=-1)
    return linear(value * swish(gate), w[name + "net.2.weight"], w[name + "net.2.bias"])


def attention(config: ConformerConfig, w: dict, name: str, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(L, D) -> (L, D): multi-head attention, every frame with every frame of the
    chunk, plus the relative bias (and the reference's constant +1)."""
    L, D = x.shape
    heads, hd = config.num_attention_heads, config.head_dim

    def project(p):  # (L, D) -> (heads, L, hd), contiguous so each product below is one BLAS call
        y = linear(x, w[f"{name}linear_{p}.weight"], w[f"{name}linear_{p}.bias"])
        return np.ascontiguousarray(y.reshape(L, heads, hd).transpose(1, 0, 2))

    q, k, v = project("q"), project("k"), project("v")
    k_t = np.ascontiguousarray(k.transpose(0, 2, 1))  # (heads, hd, L)
    scores = (q @ k_t) * np.float32(hd**-0.5) + (np.float32(1.0) + bias)  # (heads, L, L)
    mixed = (softmax(scores, axis=-1) @ v).transpose(1, 0, 2).reshape(L, D)
    return linear(mixed, w[name + "linear_out.weight"], w[name + "linear_out.bias"])


def convolution(config: ConformerConfig, w: dict, name: str, x: np.ndarray) -> np.ndarray:
    """(L, D) -> (L, D): LN, gated linear unit, causal depthwise conv, swish, pointwise.

    GLU: y = W x (2D channels), out = (y[:D] + b1) * swish(y[D:] + b2).
    The depthwise kernel of width K reads frames t-K+1 .. t only (the reference pads
    both sides by K-1 and drops the last K-1 outputs): nothing from the future.
    """
    L, D = x.shape
    K = config.kernel_size
    h = layer_norm(x, w[name + "layer_norm.weight"], w[name + "layer_norm.bias"], LN_EPS)
    glu = linear(h, channel_matrix(w[name + "glu.ext_pw_conv_1d.weight"]), w[name + "glu.ext_pw_conv_1d.bias"])  # (L, 2D)
    h = (glu[:, :D] + w[name + "glu.b1"].reshape(D)) * swish(glu[:, D:] + w[name + "glu.b2"].reshape(D))  # (L, D)
    kernel = np.asarray(w[name + "dw_sep_conv_1d.dw_conv.weight"], dtype=np.float32).reshape(D, K)
    past = np.concatenate([np.zeros((K - 1, D), np.float32), h])  # (L + K - 1, D)
    depthwise = past[0:L] * kernel[:, 0]
    for tap in range(1, K):
        depthwise += past[tap : tap + L] * kernel[:, tap]
    depthwise += w[name + "dw_sep_conv_1d.dw_conv.bias"]
    h = linear(depthwise, channel_matrix(w[name + "dw_sep_conv_1d.pw_conv.weight"]), w[name + "dw_sep_conv_1d.pw_conv.bias"])
    return linear(swish(h), channel_matrix(w[name + "ext_pw_conv_1d.weight"]), w[name + "ext_pw_conv_1d.bias"])


def conformer_block(config: ConformerConfig, w: dict, i: int, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    name = f"{CONFORMER}encoders.{i}."
    x = x + np.float32(0.5) * feed_forward(w, name + "feed_forward_in.", x)
    h = layer_norm(x, w[name + "layer_norm_att.weight"], w[name + "layer_norm_att.bias"], LN_EPS)
    x = x + attention(config, w, name + "self_attn.", h, bias)
    x = x + convolution(config, w, name + "conv.", x)
    x = x + np.float32(0.5) * feed_forward(w, name + "feed_forward_out.", x)
    return layer_norm(x, w[name + "layer_norm.weight"], w[name + "layer_norm.bias"], LN_EPS)


def conformer_encoder(config: ConformerConfig, weights: dict, features: np.ndarray, trace=NO_TRACE) -> np.ndarray:
    """(T, 80) log-mel features -> (ceil(T/8), D) encoder states.

    Past 500 frames the sequence is zero-padded to a multiple of 500 and each chunk
    of 500 is encoded alone, the padding included (the reference does the same and
    cuts the padding off afterwards).
    """
    p = CONFORMER + "encoder_embedding."
    x = (features - weights[p + "global_mean"]) * weights[p + "global_invstd"]  # (T, 80)
    x = subsample(config, weights, np.asarray(x, dtype=np.float32))  # (T', D)
    trace.record("audio_conv", x)
    n = len(x)
    chunk = n if n <= MAX_CHUNK else MAX_CHUNK
    padded = np.concatenate([x, np.zeros((-n % chunk, x.shape[1]), np.float32)])
    bias = relative_bias(config, weights, chunk)
    out = []
    for start in range(0, len(padded), chunk):
        h = padded[start : start + chunk]
        for i in range(config.num_blocks):
            h = conformer_block(config, weights, i, h, bias)
        out.append(h)
    return np.concatenate(out)[:n]
