"""Build the golden fixtures under tests/fixtures/ with Hugging Face transformers.

    pip install -e '.[reference]'
    python tools/make_fixtures.py            # rewrites tests/fixtures/

For each variant of the Phi-3 architecture, this makes a tiny random checkpoint
with transformers, writes it the way hub checkpoints look (safetensors, a hub
style config.json, generation_config.json, tokenizer files), then loads it back
*with transformers* from disk and records, in `reference.safetensors`:

    case.<name>.input_ids  (T,)    int64    token ids fed in one forward
    case.<name>.logits     (T, V)  float32  transformers' logits for them
    greedy.prompt          (P,)    int64
    greedy.tokens          (N,)    int64    transformers' greedy continuation (ends early
                                            at a generation_config.json stop id, if one comes)

PhiMoE variants also record transformers' routing of every case, layer by layer:

    case.<name>.experts         (L, T, 2)  int64    the two experts sparsemixer chose
    case.<name>.expert_weights  (L, T, 2)  float32  and their weights

PhiMoE with LongRoPE past the original length: transformers 5 never switches PhiMoE
to the long factors (4.57.1 and Microsoft's code do); minislm follows the model's
design, so that fixture's reference is transformers 5 with its rotary embedding
switched by length (`minislm.verify.phimoe_longrope_as_designed`); the metadata says
so. Below the original length that patch changes nothing.

The default test suite compares minislm against these files, so it needs
neither torch nor transformers. Versions used are stored in the file's metadata.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import Phi3Config, Phi3ForCausalLM, PhimoeConfig, PhimoeForCausalLM
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from minislm.verify import phimoe_longrope_as_designed

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
VOCAB_SIZE = 384  # embedding rows; the tokenizer knows fewer ids, like Phi-3 (32011 of 32064)
MODEL_CLASSES = {"phi3": (Phi3Config, Phi3ForCausalLM), "phimoe": (PhimoeConfig, PhimoeForCausalLM)}

# name -> (config overrides, {case name: sequence length}, greedy (prompt, new tokens), layout)
VARIANTS = {
    "mha": (dict(num_attention_heads=4, num_key_value_heads=4), {"seq": 48}, (24, 20), "hub"),
    "gqa": (dict(num_attention_heads=8, num_key_value_heads=2), {"seq": 48}, (24, 20), "transformers5"),
    "longrope": (
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": "ramp:1:1.5", "long_factor": "ramp:1:6"},
        ),
        {"below": 40, "above": 100},
        (56, 20),  # 56 + 20 crosses the original length (64): the switch happens mid-generation
        "hub",
    ),
    "sliding": (dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8), {"seq": 40}, (24, 20), "hub"),
    "partial_tied": (
        dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, tie_word_embeddings=True),
        {"seq": 48},
        (24, 20),
        "hub",
    ),
    "sharded_bf16": (dict(num_attention_heads=4, num_key_value_heads=2), {"seq": 48}, (24, 20), "hub"),
    # Phi-3.5-MoE's router eps (0.01) makes most weights 1.0; the larger eps of the
    # other two variants lets several experts survive sparsemixer's masking.
    "moe": (
        dict(model_type="phimoe", num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
             attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01),
        {"seq": 48},
        (24, 20),
        "hub",
    ),
    "moe_longrope": (
        dict(
            model_type="phimoe",
            hidden_size=64,  # 8 heads of 8 dims: 4 rotary frequencies for the factors to act on
            intermediate_size=32,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            rope_theta=10000.0,
            attention_bias=True,
            router_jitter_noise=0.3,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_scaling={
                "type": "longrope", "short_factor": "ramp:1:1.5", "long_factor": "ramp:1:6",
                "short_mscale": 1.1, "long_mscale": 1.35, "original_max_position_embeddings": 64,
            },
        ),
        {"below": 40, "above": 100},
        (56, 20),  # crosses the original length (64) mid-generation
        "transformers5",
    ),
    "moe_sharded_bf16": (
        dict(model_type="phimoe", num_attention_heads=4, num_key_value_heads=4, num_local_experts=2,
             router_jitter_noise=0.1, sliding_window=8),
        {"seq": 40},
        (24, 20),
        "hub",
    ),
    # Phi-4 (and -reasoning/-plus, same architecture): 4:1 GQA, RoPE base 250000, no window, untied
    # (microsoft/phi-4's config.json as a copy on the hub shows it; docs/architecture.md has the sources).
    # The reasoning models' own RoPE base is unverified; this fixture does not depend on it.
    "phi4": (dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=250000.0), {"seq": 48}, (24, 20), "transformers5"),
    # Phi-4-mini (and -reasoning): 3:1 GQA, partial rotary 0.75, tied embeddings, LongRoPE.
    "phi4_mini": (
        dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
             tie_word_embeddings=True, max_position_embeddings=256, original_max_position_embeddings=64,
             rope_scaling={"type": "longrope", "short_factor": "ramp:1:1.5", "long_factor": "ramp:1:6"}),
        {"below": 40, "above": 100},
        (56, 20),
        "hub",
    ),
    # Phi-tiny-MoE (SlimMoE): heads x head_dim narrower than hidden, a window, biases, RoPE base 10000
    # (a copy of its config.json on the hub; docs/moe.md). Phi-mini-MoE's shape is unverified.
    "slimmoe": (
        dict(model_type="phimoe", num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
             attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, sliding_window=6, rope_theta=10000.0),
        {"seq": 40},
        (24, 20),
        "hub",
    ),
}
BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    pad_token_id=0,
)


def build_tokenizer() -> Tokenizer:
    """A SentencePiece-style character tokenizer with Phi-3's machinery: "▁" for spaces,
    byte fallback for anything else, the same decoder chain, Phi-3's special tokens."""
    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    model = BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>"] + SPECIAL_TOKENS)
    return tok


def write_tokenizer(folder: Path, tok: Tokenizer) -> dict:
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "LlamaTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def ramp(spec, n: int) -> list[float]:
    _, lo, hi = spec.split(":")
    return [float(v) for v in np.linspace(float(lo), float(hi), n)]


def make_config(overrides: dict, special_ids: dict):
    """The variant's transformers config, and the model class that goes with it."""
    kw = dict(BASE, **overrides)
    config_class, model_class = MODEL_CLASSES[kw.pop("model_type", "phi3")]
    kw["eos_token_id"] = special_ids["<|endoftext|>"]
    scaling = kw.get("rope_scaling")
    if scaling:
        head_dim = kw["hidden_size"] // kw["num_attention_heads"]
        n = int(head_dim * kw.get("partial_rotary_factor", 1.0)) // 2
        kw["rope_scaling"] = {k: ramp(v, n) if isinstance(v, str) and v.startswith("ramp") else v for k, v in scaling.items()}
    return config_class(**kw), model_class


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights large enough that logits spread over ~10 units: argmax ties are then
    vanishingly rare, so top-1 and greedy comparisons mean something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # PhiMoE's norm, attention and lm_head biases
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:  # norm gains around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)


def hub_style_config(path: Path, model) -> None:
    """Rewrite config.json the way Microsoft's hub files look: rope_theta and
    original_max_position_embeddings at the top, LongRoPE under rope_scaling
    (PhiMoE's also holds its mscales and the original length there)."""
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters", {}) or {}
    raw["rope_theta"] = params.get("rope_theta", 10000.0)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raw["partial_rotary_factor"] = params["partial_rotary_factor"]
    if params.get("rope_type") == "longrope":
        keys = ["short_factor", "long_factor"]
        if raw["model_type"] == "phimoe":
            keys += ["short_mscale", "long_mscale", "original_max_position_embeddings"]
        raw["rope_scaling"] = {"type": "longrope", **{k: params[k] for k in keys}}
    else:
        raw["rope_scaling"] = None
    raw["architectures"] = [type(model).__name__]
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def write_generation_config(folder: Path, special_ids: dict) -> None:
    stop = [special_ids["<|endoftext|>"], special_ids["<|assistant|>"], special_ids["<|end|>"]]
    config = {"bos_token_id": 1, "eos_token_id": stop, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_variant(name: str, out: Path, tok: Tokenizer, seed: int) -> None:
    overrides, cases, (prompt_len, new_tokens), layout = VARIANTS[name]
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    special_ids = write_tokenizer(folder, tok)

    generator = torch.Generator().manual_seed(seed)
    config, model_class = make_config(overrides, special_ids)
    model = model_class(config).eval()
    randomize(model, generator)
    if name.endswith("sharded_bf16"):
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    else:
        model.save_pretrained(folder)
    if layout == "hub":
        hub_style_config(folder / "config.json", model)
    write_generation_config(folder, special_ids)

    # The reference is transformers reading the files we just wrote, in float32.
    ref = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    metadata = {"transformers": transformers.__version__, "torch": torch.__version__, "variant": name}
    if phimoe_longrope_as_designed(ref):
        metadata["longrope_reference"] = (
            "transformers with PhiMoE's rotary embedding switched to long_factor/long_mscale past "
            "original_max_position_embeddings (minislm.verify.phimoe_longrope_as_designed), as in 4.57.1"
        )
    tensors = {}
    rng = np.random.default_rng(seed)
    vocab = tok.get_vocab_size()  # sample ids the tokenizer knows
    for case, length in cases.items():
        ids = rng.integers(0, vocab, length).astype(np.int64)
        with torch.no_grad():
            out = ref(torch.from_numpy(ids)[None], output_router_logits=config.model_type == "phimoe")
        tensors[f"case.{case}.input_ids"] = ids
        tensors[f"case.{case}.logits"] = np.ascontiguousarray(out.logits[0].float().numpy(), dtype=np.float32)
        if config.model_type == "phimoe":
            tensors.update(routing(f"case.{case}.", out.router_logits, config.router_jitter_noise))
    prompt = rng.integers(0, vocab, prompt_len).astype(np.int64)
    with torch.no_grad():
        out = ref.generate(
            torch.from_numpy(prompt)[None],
            attention_mask=torch.ones(1, prompt_len, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    greedy = out[0, prompt_len:].tolist()
    # generate() uses transformers' cache; the definition is a full forward per token.
    # Record nothing that the two disagree on.
    sequence = prompt.tolist()
    for expected in greedy:
        with torch.no_grad():
            assert int(ref(torch.tensor([sequence])).logits[0, -1].argmax()) == expected, name
        sequence.append(expected)
    tensors["greedy.prompt"] = prompt
    tensors["greedy.tokens"] = np.array(greedy, dtype=np.int64)
    save_file(tensors, folder / "reference.safetensors", metadata=metadata)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{name:14s} {size / 1024:7.1f} KiB  cases {list(cases)}  greedy {prompt_len}+{new_tokens}")


def routing(prefix: str, router_logits, jitter_eps: float) -> dict:
    """transformers' own sparsemixer on each layer's router logits: experts and weights (L, T, 2)."""
    experts, weights = [], []
    for logits in router_logits:  # one (T, E) per layer
        w, e = sparsemixer(logits.reshape(-1, logits.shape[-1]), jitter_eps=jitter_eps, training=False)
        experts.append(e.numpy())
        weights.append(w.float().numpy())
    return {prefix + "experts": np.stack(experts).astype(np.int64), prefix + "expert_weights": np.stack(weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="make these variants only (same seeds)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tok = build_tokenizer()
    for i, name in enumerate(VARIANTS):
        if args.only is None or name in args.only:
            make_variant(name, args.out, tok, args.seed + i)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"total {total / 2**20:.2f} MiB in {args.out}")


if __name__ == "__main__":
    main()
