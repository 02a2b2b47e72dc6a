"""The recorder: a window into a forward pass, for learners and for `minislm verify`.

`model.forward(..., trace=Recorder())` keeps a copy of every intermediate value the
decoder computes, named after the step of the recipe it belongs to, in the order
they happen. Without a recorder the forward pass records nothing and does no extra
work: every `trace.record(...)` line in the spine then calls `minislm.model.NO_TRACE`,
whose methods return at once, and values that exist only for a learner (attention
probabilities, which the fast path never needs in full) are computed only when a
recorder asks for them.

The steps, per layer unless marked (T tokens in this forward, S = tokens cached
after it, H / KV heads, hd head size, D hidden, F ffn, E experts, V vocab):

    image_views        (n, 3, 336, 336)  an image's global view and crops  [no layer; phi3_v, one per image]
    image_patches      (n, 576, 1024)    CLIP's features of each view      [no layer; phi3_v, one per image]
    image_pooled       (n, 16, 16, C)    SigLIP's features, 2x2-averaged   [no layer; phi4mm, one per image]
    image_tokens       (k, D)      the image's projected tokens            [no layer; phi3_v, phi4mm, one per image]
    audio_features     (T_a, 80)   a recording's log-mel frames            [no layer; phi4mm, one per audio]
    audio_conv         (T_a/8, Da) after the Conformer's subsampling convolutions [no layer; phi4mm]
    audio_states       (T_a/8, Da) the Conformer's output                  [no layer; phi4mm, one per audio]
    audio_tokens       (k, D)      the recording's projected tokens        [no layer; phi4mm, one per audio]
    image_positions    (k',)       where this forward's image (and audio) tokens sit   [no layer; phi3_v, phi4mm]
    embed              (T, D)      token embeddings                      [no layer]
    attn_norm          (T, D)      input_layernorm(x): what attention reads
    q                  (H, T, hd)  queries, after RoPE
    k                  (KV, T, hd) keys of the new tokens, after RoPE
    v                  (KV, T, hd) values of the new tokens
    attn_probs         (h, T, S)   softmax(q k^T / sqrt(hd) + mask) for the chosen heads
    attn_heads         (T, H*hd)   every head's mix of values, side by side
    attn_out           (T, D)      o_proj(attn_heads): attention's contribution
    resid_mid          (T, D)      x + attn_out: the residual stream between the blocks
    ffn_norm           (T, D)      post_attention_layernorm(x): what the feed-forward reads
    gate, up           (T, F)      SwiGLU's two halves (Phi-3)
    router_logits      (T, E)      the router's score per expert (PhiMoE)
    experts            (T, 2)      the two experts sparsemixer chose, first choice first (PhiMoE)
    expert_weights     (T, 2)      their weights (PhiMoE)
    ffn_out            (T, D)      the feed-forward's contribution
    resid_post         (T, D)      x after the layer: the residual stream
    final_norm         (T, D)      model.norm(x)                         [no layer]
    logits             (T, V)      lm_head(final_norm)                   [no layer]

Recording is bounded: attention probabilities alone are heads x T x S floats per
layer (3.8 GiB for 32 heads, 32 layers and T = S = 1000). Choose `layers`, `heads`
and `names`; past `max_bytes` the recorder refuses with a message saying what to
narrow, before the large array is computed.

`SummaryRecorder` keeps only each step's shape, dtype and statistics (what
`python -m minislm trace` prints), so a trace of any prompt length fits in a few
kilobytes; its budget then bounds the one value computed for it at a time (a
layer's attention probabilities).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import MinislmError

LAYER_STEPS = (
    "attn_norm", "q", "k", "v", "attn_probs", "attn_heads", "attn_out", "resid_mid",
    "ffn_norm", "gate", "up", "router_logits", "experts", "expert_weights", "ffn_out", "resid_post",
)
# phi3_v and Phi-4-multimodal, before embed
VISION_STEPS = ("image_views", "image_patches", "image_pooled", "image_tokens", "audio_features", "audio_conv",
                "audio_states", "audio_tokens", "image_positions")
MODEL_STEPS = VISION_STEPS + ("embed", "final_norm", "logits")
STEPS = VISION_STEPS + ("embed",) + LAYER_STEPS + ("final_norm", "logits")  # forward order
# What a recorder may hold unless told otherwise: enough for every step of the shipped
# model on a 128-token prompt, small next to the memory of a real Phi-3 run.
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Step:
    """One recorded value: which step, which layer (None for embed/final_norm/logits),
    which forward pass (0 = the first the recorder saw), and the positions it covers."""

    name: str
    layer: int | None
    value: np.ndarray
    forward: int
    positions: np.ndarray  # (T,) the sequence positions of this forward's tokens


class Recorder:
    """Keeps the steps it is asked for; `steps` lists them in the order they happened.

    names:  steps to keep (default: all of STEPS)
    layers: layer indices to keep (default: all); embed/final_norm/logits are kept regardless
    heads:  query heads whose attention probabilities to keep (default: all)
    """

    def __init__(
        self,
        names: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        heads: Iterable[int] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.names = frozenset(STEPS if names is None else names)
        unknown = self.names - set(STEPS)
        if unknown:
            raise ValueError(f"unknown step names {sorted(unknown)}; known: {', '.join(STEPS)}")
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        self.heads = None if heads is None else np.array(sorted(set(int(h) for h in heads)), dtype=np.int64)
        self.max_bytes = max_bytes
        self.steps: list[Step] = []
        self.nbytes = 0
        self.forwards = 0  # forward passes begun
        self._positions = np.zeros(0, dtype=np.int64)

    # ---- called by the forward pass

    def begin(self, positions: np.ndarray) -> None:
        """A forward pass over tokens at `positions` starts."""
        self.forwards += 1
        self._positions = np.array(positions, dtype=np.int64)

    def wants(self, name: str, layer: int | None = None, nbytes: int = 0) -> bool:
        """Whether `record(name, ..., layer)` would keep the value; raises if a value of
        `nbytes` would take the recording past max_bytes (checked before computing it)."""
        if name not in self.names or (layer is not None and self.layers is not None and layer not in self.layers):
            return False
        if self.nbytes + nbytes > self.max_bytes:
            raise RecordingTooLarge(
                f"recording {name}{'' if layer is None else f' of layer {layer}'} would take the trace to "
                f"{(self.nbytes + nbytes) / 2**20:.0f} MiB, past its limit of {self.max_bytes / 2**20:.0f} MiB: "
                "record fewer layers, heads or steps, or use a shorter prompt"
            )
        return True

    def record(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        """Keep a copy of `value` if this step and layer are wanted (the forward pass may
        reuse or overwrite its own arrays later)."""
        value = np.asarray(value)
        if not self.wants(name, layer, value.nbytes):
            return
        self.steps.append(Step(name, layer, value.copy(), self.forwards - 1, self._positions))
        self.nbytes += value.nbytes

    def attention_heads(self, layer: int, n_heads: int) -> np.ndarray | None:
        """The query heads whose attention probabilities this layer should record, or None."""
        if not self.wants("attn_probs", layer):
            return None
        heads = np.arange(n_heads) if self.heads is None else self.heads
        if heads.size and (heads.min() < 0 or heads.max() >= n_heads):
            raise RecordingTooLarge(f"head {int(heads.max())} does not exist: the model has {n_heads} query heads")
        return heads

    # ---- read by whoever asked

    def get(self, name: str, layer: int | None = None, forward: int = -1) -> np.ndarray:
        """The value of one step (of the last forward pass, unless `forward` says which)."""
        forward = forward if forward >= 0 else self.forwards + forward
        for step in self.steps:
            if step.name == name and step.layer == layer and step.forward == forward:
                return step.value
        where = "" if layer is None else f" of layer {layer}"
        raise KeyError(f"no '{name}'{where} recorded in forward pass {forward}")

    def per_layer(self, name: str, forward: int = -1) -> list[np.ndarray]:
        """One step's values for every recorded layer, in layer order."""
        forward = forward if forward >= 0 else self.forwards + forward
        return [s.value for s in self.steps if s.name == name and s.forward == forward and s.layer is not None]

    def clear(self) -> None:
        self.steps.clear()
        self.nbytes = 0
        self.forwards = 0


@dataclass(frozen=True)
class StepSummary:
    """What `SummaryRecorder` keeps of one step: its shape, dtype and statistics."""

    name: str
    layer: int | None
    forward: int
    shape: tuple[int, ...]
    dtype: str
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, name: str, layer: int | None, forward: int, value: np.ndarray) -> "StepSummary":
        """Statistics in float64, so a mean over millions of float32 values stays exact."""
        wide = value.astype(np.float64)
        return cls(
            name, layer, forward, tuple(value.shape), str(value.dtype),
            float(wide.mean()), float(wide.std()), float(wide.min()), float(wide.max()),
        )


class SummaryRecorder(Recorder):
    """A Recorder that keeps `StepSummary`s in `summaries` instead of copies of the values.

    Nothing is kept whole, so `nbytes` stays 0 and `max_bytes` bounds each value on
    its own: the attention probabilities of one layer are computed, summarised and
    dropped before the next layer's.
    """

    def __init__(self, names=None, layers=None, heads=None, max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(names, layers, heads, max_bytes)
        self.summaries: list[StepSummary] = []

    def record(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        value = np.asarray(value)
        if self.wants(name, layer, value.nbytes):
            self.summaries.append(StepSummary.of(name, layer, self.forwards - 1, value))

    def clear(self) -> None:
        super().clear()
        self.summaries.clear()


class RecordingTooLarge(MinislmError):
    """A recording that would not fit the recorder's budget (or asks for a head that
    does not exist): one line saying what to narrow."""
