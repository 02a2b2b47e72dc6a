"""What to say when the logits come out NaN or Inf.

A damaged checkpoint (a NaN in a matrix, an Inf in an embedding row) does not
crash anything: NumPy carries NaN through every matmul, the sampler's argmax
of all-NaN logits is id 0, and the user gets empty text or "nan nats/char".
Scanning every matrix at load would read gigabytes; instead each forward that
produces logits checks them (`check_logits`: one pass over V floats, nothing
next to a matmul of V x D). Only when that check fails do we pay for a
diagnosis: `first_non_finite` runs the forward again with a recorder that
looks at every step (`FirstNonFinite`), and names the first step and layer
where the values went non-finite, and the tensors there that hold NaN/Inf.
The forward pass itself gains no per-layer checks.
"""

import numpy as np

from .errors import MinislmError
from .model import NoRecorder


def check_logits(model, logits: np.ndarray, token_ids) -> None:
    """Raise a MinislmError naming where things went wrong unless all logits are finite.

    `token_ids` is the whole sequence whose forward produced the logits (the
    diagnosis re-runs it from scratch)."""
    if np.isfinite(logits).all():
        return
    where = first_non_finite(model, token_ids)
    raise MinislmError(
        f"{model.path}: the model computed NaN/Inf logits; {where}. "
        "The checkpoint is damaged (or its values overflow float32)"
    )


def first_non_finite(model, token_ids) -> str:
    """Where the forward over `token_ids` first produces NaN or Inf, in words."""
    ids = np.asarray(token_ids, dtype=np.int64)
    watch = FirstNonFinite()
    model.lm_head(model.forward(ids, model.new_cache(len(ids)), watch), watch)
    if watch.found is None:
        return "no step of a second run produced them (values overflow float32 only sometimes?)"
    step, layer, value = watch.found
    if step == "embed":
        rows = np.unique(ids[~np.isfinite(value).all(axis=-1)])
        return f"the embedding rows of token ids {rows[:8].tolist()} in 'model.embed_tokens.weight' are not finite"
    if layer is not None:
        return f"the first non-finite values appear in layer {layer} ({step}){damaged_tensors(model, f'model.layers.{layer}.')}"
    if step == "final_norm":
        return f"the first non-finite values appear in the final norm{damaged_tensors(model, 'model.norm.')}"
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head."
    return f"the first non-finite values appear in the lm_head{damaged_tensors(model, head)}"


class FirstNonFinite(NoRecorder):
    """A recorder that keeps nothing but the first step, in forward order, whose values
    are not all finite: (step name, layer, value). Attention probabilities are skipped
    (they would be computed just for this; `attn_heads` follows them anyway)."""

    def __init__(self):
        self.found = None

    def wants(self, name, layer=None, nbytes=0) -> bool:
        return self.found is None and name != "attn_probs"

    def record(self, name, value, layer=None) -> None:
        if self.wants(name, layer) and not np.isfinite(value).all():
            self.found = (name, layer, np.asarray(value))


def damaged_tensors(model, prefix: str) -> str:
    """', in tensor(s) ...' for the weights under `prefix` that hold NaN/Inf, or ''."""
    bad = [name for name, w in model.weights.items() if name.startswith(prefix) and not all_finite(w)]
    return f", in tensor {', '.join(repr(n) for n in bad)}" if bad else " (no tensor of it holds NaN/Inf: values overflow)"


def all_finite(weight) -> bool:
    """float32 arrays directly; weight objects through their stored arrays: bf16 words
    (a bf16 matrix) are NaN/Inf when all exponent bits are set, float arrays (packed
    int4/int8 scales in float16 or float32, offsets) through np.isfinite, integer
    codes never."""
    if isinstance(weight, np.ndarray):
        return bool(np.isfinite(weight).all())
    for array in weight.tensors("w").values():
        if array.dtype == np.uint16 and np.any((array & 0x7F80) == 0x7F80):
            return False
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return False
    return True
