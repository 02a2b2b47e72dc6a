"""`minislm verify`: run a checkpoint through minislm and transformers, side by side.

Three levels of evidence, cheapest to read first: the largest logit difference
and top-1 agreement; the residual stream after every layer, so a mismatch names
the first layer where it appears; and the greedy continuation, token for token.
transformers runs in float32 with `trust_remote_code=False`: the reference is its
own Phi-3 code, never code downloaded with the model.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import MinislmError
from .trace import Recorder

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away,"
# A layer "diverges" when its residual stream differs by more than this fraction of the
# reference's largest value. float32 with a different summation order stays near 1e-6.
RELATIVE_DIVERGENCE = 1e-4


@dataclass
class Comparison:
    n_tokens: int
    max_abs_diff: float
    top1_agree: int
    layer_diffs: list[tuple[str, float, float]] = field(default_factory=list)  # (name, max |Δ|, max |ref|)
    ours_greedy: list[int] = field(default_factory=list)
    ref_greedy: list[int] = field(default_factory=list)

    @property
    def first_divergent_layer(self) -> str | None:
        for name, diff, scale in self.layer_diffs:
            if diff > RELATIVE_DIVERGENCE * max(scale, 1.0):
                return name
        return None


def import_reference():
    try:
        import torch
        import transformers
    except ImportError:
        raise MinislmError(
            "verify compares against transformers: pip install torch transformers (minislm's 'reference' extra)"
        ) from None
    return torch, transformers


def compare(ours, ref, token_ids: np.ndarray, max_new_tokens: int) -> Comparison:
    """Logits, per-layer residual streams and greedy tokens of `ours` vs the torch model `ref`."""
    torch, _ = import_reference()
    captured = []

    def keep_output(module, inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[0].detach().float().numpy())

    layers = ref.model.layers
    hooks = [layer.register_forward_hook(keep_output) for layer in layers]
    try:
        with torch.no_grad():
            ref_out = ref(torch.tensor(token_ids[None, :], dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    ref_logits = ref_out.logits[0].float().numpy()

    trace = Recorder(names=("resid_post", "logits"))
    our_logits = ours.logits(token_ids, trace)
    layer_diffs = [
        (f"layer {i}", float(np.abs(a - b).max()), float(np.abs(b).max()))
        for i, (a, b) in enumerate(zip(trace.per_layer("resid_post"), captured))
    ]
    result = Comparison(
        n_tokens=len(token_ids),
        max_abs_diff=float(np.abs(our_logits - ref_logits).max()),
        top1_agree=int((our_logits.argmax(-1) == ref_logits.argmax(-1)).sum()),
        layer_diffs=layer_diffs,
    )
    if max_new_tokens > 0:
        result.ours_greedy = list(ours.generate(token_ids, max_new_tokens))
        with torch.no_grad():
            out = ref.generate(
                torch.tensor(token_ids[None, :], dtype=torch.long),
                attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        result.ref_greedy = out[0, len(token_ids) :].tolist()
    return result


def load_reference(model_dir):
    torch, transformers = import_reference()
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=False
        ).eval()
    except Exception as e:
        raise MinislmError(f"{model_dir}: transformers cannot load it ({str(e).splitlines()[0][:200]})") from None
    phimoe_longrope_as_designed(ref)
    return ref


def phimoe_longrope_as_designed(ref) -> bool:
    """Make a transformers 5 PhiMoE switch LongRoPE factors by sequence length; True if patched.

    Microsoft's modeling_phimoe.py and transformers 4.57.1 use the long factors with
    `long_mscale` once a sequence is longer than original_max_position_embeddings.
    transformers 5.x switches only the mscale and keeps the short factors at every
    length. Below the original length the two agree. minislm follows the model's
    design; this replaces the reference's rotary embedding by one that does too
    (the same arithmetic as transformers' own, with `seq_len` passed on, as 4.57.1 does).
    """
    torch, transformers = import_reference()
    rotary = getattr(getattr(ref, "model", None), "rotary_emb", None)
    if ref.config.model_type != "phimoe" or getattr(rotary, "rope_type", None) != "longrope":
        return False
    if int(transformers.__version__.split(".")[0]) < 5:
        return False  # 4.x already switches (and its rotary embedding has another signature)
    params = ref.config.rope_parameters

    def forward(x, position_ids):
        seq_len = int(position_ids.max()) + 1
        long = seq_len > params["original_max_position_embeddings"]
        inv_freq, _ = rotary.rope_init_fn(ref.config, x.device, seq_len)  # long factors past the switch
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        mscale = params["long_mscale"] if long else params["short_mscale"]
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)

    rotary.forward = forward
    return True


def run_verify(args) -> int:
    from .commands import model_argument
    from .hub import resolve_model_dir
    from .load import load, stored_quantization

    model_dir = resolve_model_dir(model_argument(args), args.revision)
    stored = stored_quantization(model_dir)
    if stored is not None:
        # transformers would not refuse it: it would warn about unused qweight/scales
        # tensors and compare us against randomly initialised weights.
        raise MinislmError(
            f"--model {model_dir}: a minislm {stored.describe()} checkpoint, which transformers cannot load the same "
            "way; verify the checkpoint it was quantized from"
        )
    import_reference()
    ours = load(model_dir)
    if args.prompt is not None:
        if ours.tokenizer is None:
            raise MinislmError(f"{model_dir}: --prompt needs a tokenizer.json in the model folder")
        ids = np.array(ours.tokenizer.encode(args.prompt), dtype=np.int64)
    elif ours.tokenizer is not None:
        ids = np.array(ours.tokenizer.encode(DEFAULT_PROMPT), dtype=np.int64)
    else:
        ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, 32)
    if ids.size == 0:
        raise MinislmError("--prompt: encodes to no tokens")

    result = compare(ours, load_reference(model_dir), ids, args.max_tokens)
    ok = result.max_abs_diff <= args.atol and result.top1_agree == result.n_tokens
    ok = ok and result.ours_greedy == result.ref_greedy
    print(f"minislm verify: {model_dir} ({ours.config.model_type}, {ours.config.num_hidden_layers} layers)")
    if ours.config.model_type == "phimoe" and ours.config.rope.kind == "longrope":
        print("reference: transformers, with PhiMoE's LongRoPE switched to the long factors past the original "
              "length as the model was designed (transformers 5 never switches; see docs/moe.md)")
    print(f"tokens: {result.n_tokens}")
    print(f"max |logit difference|: {result.max_abs_diff:.3g} (tolerance {args.atol:g})")
    print(f"top-1 agreement: {result.top1_agree}/{result.n_tokens}")
    for name, diff, scale in result.layer_diffs:
        print(f"  {name}: max |difference| {diff:.3g} (max |value| {scale:.3g})")
    print(f"first diverging layer: {result.first_divergent_layer or 'none'}")
    if args.max_tokens > 0:
        same = result.ours_greedy == result.ref_greedy
        print(f"greedy {len(result.ref_greedy)} tokens: {'identical' if same else 'DIFFERENT'}")
        if not same:
            print(f"  minislm:      {result.ours_greedy}")
            print(f"  transformers: {result.ref_greedy}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1
