"""LoRA: a low-rank change to a matrix, added at run time or merged in.

A LoRA adapter leaves every weight W of the model as it is and adds, for some
matrices, two thin ones: A (r, in) and B (out, r) with a small rank r. The layer
then computes

    y = W·x + (B·(A·x))·scale            scale = lora_alpha / r  (PEFT's rule)

which costs r·(in + out) multiply-adds per token instead of W's in·out, and is
exactly what W + scale·B·A would compute (`merge_adapter` makes that matrix, for
when one adapter is used all the time).

Phi-4-multimodal ships two such adapters over the same Phi-4-mini decoder: one for
prompts with pictures (vision, r = 256) and one for speech (r = 320), both on every
layer's qkv_proj, o_proj, gate_up_proj and down_proj. The same arithmetic loads a
PEFT adapter folder for any Phi model (`read_peft_adapter`, `--lora DIR`).

`LoraWeight` is a matrix that multiplies itself (model.py's `linear` calls
`matmul`), so the decoder's code does not change: `with_adapter` returns the
weights dict with the adapted matrices swapped in, and the model runs as before.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import read_json
from .errors import MinislmError
from .model import linear
from .weights import PICKLE_SUFFIXES, read_safetensors

PEFT_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before every name
# adapter_config.json keys that change what the adapter computes beyond W·x + (B·(A·x))·scale
# (use_dora, use_qalora ... are refused by their "use_" prefix)
VARIANT_KEYS = ("fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layers_pattern", "exclude_modules", "layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "megatron_config")


@dataclass(frozen=True)
class LoraPair:
    """The two thin matrices of one adapted matrix: A (r, in), B (out, r): float32
    arrays, or bf16 weights (minislm.kernels.Bf16Weight) beside packed base weights."""

    A: object
    B: object
    scale: float


def as_float32(w) -> np.ndarray:
    """A thin matrix as a float32 array (a bf16 weight widened)."""
    return w if isinstance(w, np.ndarray) else w.rows(np.arange(w.shape[0]))


def packed_adapter(adapter: "Adapter") -> "Adapter":
    """The adapter with its A and B as bf16 weights: half the bytes a decode step reads
    for them, beside bf16 or int4 base weights. (The hub's adapters are bf16 in the file:
    nothing is lost.)"""
    from .kernels import Bf16Weight

    pairs = {name: LoraPair(Bf16Weight(as_float32(p.A), name=name + " lora_A"), Bf16Weight(as_float32(p.B), name=name + " lora_B"),
                            p.scale) for name, p in adapter.pairs.items()}
    return Adapter(adapter.name, pairs)


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: the matrices it changes (by their weight names) and how."""

    name: str
    pairs: dict  # "model.layers.0.self_attn.qkv_proj.weight" -> LoraPair

    def describe(self) -> str:
        """e.g. 'vision: W·x + (B·(A·x))·2.0, r 256, on qkv_proj, o_proj, gate_up_proj, down_proj of 32 layers'."""
        ranks = sorted({int(p.A.shape[0]) for p in self.pairs.values()})
        scales = sorted({p.scale for p in self.pairs.values()})
        kinds = list(dict.fromkeys(name.split(".")[-2] for name in self.pairs))
        layers = {m.group(1) for name in self.pairs if (m := re.search(r"layers\.(\d+)\.", name))}
        scale = "/".join(f"{s:g}" for s in scales)
        rank = "/".join(map(str, ranks))
        return (f"{self.name}: W·x + (B·(A·x))·{scale}, r {rank}, on {', '.join(kinds)} of "
                f"{len(layers)} layer{'s' * (len(layers) != 1)}")


class LoraWeight:
    """W with an adapter: matmul(x) = W·x + (B·(A·x))·scale, W left untouched.

    x (T, in) -> (T, out). W may be any weight `linear` takes (float32, bf16, int4).
    """

    def __init__(self, base, pair: LoraPair):
        self.base = base
        self.pair = pair

    @property
    def shape(self):
        return self.base.shape

    @property
    def nbytes(self) -> int:
        return int(getattr(self.base, "nbytes", 0)) + int(self.pair.A.nbytes) + int(self.pair.B.nbytes)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        low_rank = linear(linear(x, self.pair.A), self.pair.B)  # (T, r) -> (T, out)
        return linear(x, self.base) + low_rank * np.float32(self.pair.scale)

    def rows(self, ids):
        raise TypeError("an adapted matrix is not an embedding table")


def with_adapter(weights: dict, adapter: Adapter | None) -> dict:
    """The weights with every matrix the adapter changes wrapped in a LoraWeight
    (a new dict; the arrays are shared, nothing is copied)."""
    if adapter is None:
        return weights
    adapted = dict(weights)
    for name, pair in adapter.pairs.items():
        adapted[name] = LoraWeight(weights[name], pair)
    return adapted


def merge_adapter(weights: dict, adapter: Adapter) -> dict:
    """W + scale·B·A for every adapted matrix, kept in W's format: float32 stays
    float32, bf16 is rounded back to bf16. int4 is refused: merging would quantize the
    sum anew, a different model from the one the adapter was trained with."""
    from .kernels import Bf16Weight

    merged = dict(weights)
    for name, pair in adapter.pairs.items():
        base = weights[name]
        delta = (as_float32(pair.B) @ as_float32(pair.A)) * np.float32(pair.scale)  # (out, in)
        if isinstance(base, np.ndarray):
            merged[name] = np.asarray(base, np.float32) + delta
        elif isinstance(base, Bf16Weight):
            widened = base.rows(np.arange(base.shape[0]))
            merged[name] = Bf16Weight(widened + delta, name=name)
        else:
            raise MinislmError(f"--merge-lora: {name} is {type(base).__name__}; merge into float32 or bf16 weights "
                               "(load without --quant int4), or keep the adapter unmerged")
    return merged


# ---------------------------------------------------------------- PEFT adapter folders


def read_peft_adapter(folder, weights: dict, config, name: str | None = None, label: str | None = None) -> Adapter:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for a model
    whose matrices are `weights`, checked: every tensor names a linear matrix of the
    decoder that adapter_config.json's target_modules selects, with matching shapes."""
    folder = Path(folder)
    where = label or f"--lora {folder}"
    if not folder.is_dir():
        raise MinislmError(f"{where}: no such adapter folder")
    if not (folder / "adapter_config.json").is_file():
        raise MinislmError(f"{where}: no adapter_config.json in this folder (a PEFT LoRA adapter has one)")
    files = folder / "adapter_model.safetensors"
    if not files.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise MinislmError(f"{where}: only {', '.join(pickles)}, a pickle, which minislm never loads (it can "
                               "run code); save the adapter with safetensors (PEFT's default)")
        raise MinislmError(f"{where}: no adapter_model.safetensors in this folder")
    settings = read_json(folder / "adapter_config.json")
    scale, targets = peft_settings(settings, where)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_safetensors(files).items()}
    pairs = lora_pairs(tensors, weights, config, where, targets, scale)
    return Adapter(name or folder.name, pairs)


def peft_settings(settings: dict, label: str) -> tuple:
    """(scale rule, target_modules) from adapter_config.json, refusing what is not plain LoRA."""
    where = f"{label}: adapter_config.json"
    if settings.get("peft_type", "LORA") != "LORA":
        raise MinislmError(f"{where}: peft_type {settings.get('peft_type')!r:.40} is not LoRA")
    if settings.get("bias", "none") not in ("none", None):
        raise MinislmError(f"{where}: bias = {settings['bias']!r:.40} is not supported (only 'none')")
    variants = [key for key, value in settings.items() if key.startswith("use_") and key != "use_rslora" and value]
    variants += [key for key in VARIANT_KEYS if settings.get(key)]
    if variants:
        raise MinislmError(f"{where}: {variants[0]} is set, a LoRA variant minislm does not run (plain LoRA and "
                           "rsLoRA only)")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MinislmError(f"{where}: r must be a positive integer, got {rank!r:.40}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise MinislmError(f"{where}: lora_alpha must be a positive number, got {alpha!r:.40}")
    scale = alpha / rank**0.5 if settings.get("use_rslora") else alpha / rank
    targets = settings.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise MinislmError(f"{where}: target_modules must be a regular expression or a list of names")
    return (rank, float(scale)), targets


def targeted(targets, module: str) -> bool:
    """PEFT's rule (check_target_module_exists): a string is a regular expression the
    whole module name must match; a list names modules by their last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def adaptable(name: str, weights: dict, config) -> bool:
    """A matrix `linear` multiplies by: a decoder layer's 2-D weight, or an untied lm_head."""
    w = weights.get(name)
    if w is None or len(getattr(w, "shape", ())) != 2:
        return False
    if name == "lm_head.weight":
        return not config.tie_word_embeddings
    return name.startswith("model.layers.") and "block_sparse_moe.gate." not in name


LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def lora_pairs(tensors: dict, weights: dict, config, where: str, targets, scale_rule) -> dict:
    """{weight name: LoraPair} from `<module>.lora_A.weight` / `<module>.lora_B.weight` tensors
    (StoredTensors), each of rank r scaled by `scale_rule` = (r, scale)."""
    rank, scale = scale_rule
    parts: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise MinislmError(f"{where}: tensor '{key}' is not a LoRA A or B matrix (minislm loads plain LoRA only)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise MinislmError(f"{where}: the adapter holds no LoRA tensors")
    pairs = {}
    for module, ab in parts.items():
        name = module + ".weight"
        if not adaptable(name, weights, config):
            raise MinislmError(f"{where}: target module '{module}' is not a linear layer of this "
                               f"{config.model_type} model's decoder")
        if targets is not None and not targeted(targets, module):
            raise MinislmError(f"{where}: the file adapts '{module}', which target_modules does not select")
        if set(ab) != {"A", "B"}:
            raise MinislmError(f"{where}: '{module}' has lora_{'A' if 'A' in ab else 'B'} but no "
                               f"lora_{'B' if 'A' in ab else 'A'}")
        out, inp = weights[name].shape
        A, B = ab["A"].float32(), ab["B"].float32()
        if A.shape != (rank, inp) or B.shape != (out, rank):
            raise MinislmError(f"{where}: '{module}' has lora_A {list(A.shape)} and lora_B {list(B.shape)}; the matrix "
                               f"is {out} x {inp} and r is {rank}, so they must be [{rank}, {inp}] and [{out}, {rank}]")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise MinislmError(f"{where}: '{module}' holds NaN or Inf values")
        pairs[name] = LoraPair(np.ascontiguousarray(A), np.ascontiguousarray(B), scale)
    return pairs
