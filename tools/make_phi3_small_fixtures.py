"""Golden fixtures for phi3small (Phi-3-small), from the hub's own remote code.

    python tools/make_phi3_small_fixtures.py --remote-code DIR   # rewrites tests/fixtures/phi3small*/

Phi-3-small is not part of transformers: its model is Python files in the hub
repository (microsoft/Phi-3-small-8k-instruct), run with `trust_remote_code`:

    configuration_phi3_small.py   modeling_phi3_small.py   positional_embedding.py
    triton_blocksparse_attention_layer.py   triton_flash_blocksparse_attn.py
    tokenization_phi3_small.py   (only its special-token table is used)

Pass a folder holding them (a clone of the hub repo or a public mirror); they are
read at run time, never committed, and their SHA-256 go into the fixture's metadata.
The committed fixtures were made from transcriptions of the stored files that leave
out what inference never runs (long docstrings, the Triton backward kernels and unit
tests, Phi3SmallForSequenceClassification, the tokenizer's tiktoken encoder); the
recorded hashes are theirs.
They run in a separate virtual environment this tool creates (default
/work/venvs/i23-small-ref, outside the repo) with REFERENCE_PACKAGES.

The remote code cannot run on a CPU as shipped, so the reference process changes
exactly three things and nothing else:

1. Dense layers call flash-attention's `flash_attn_varlen_kvpacked_func` (and assert
   it is installed). It is replaced by torch's scaled-dot-product attention, per
   sequence, with the same causal flag and softmax scale.
2. Sparse layers launch the Triton kernel `_fwd_kernel` from
   `triton_flash_blocksparse_attn._forward`. `_forward` is replaced by
   `kernel_definition` below: the same tiles, reading the same CSR layout (built by the
   remote code's own `_get_sparse_attn_mask` -> `get_sparse_attn_op` ->
   `dense_to_crow_col`, called unchanged), the kernel's token-level causal test, then a
   dense softmax over what the tiles allow. The Triton kernel also needs head_dim 64
   or 128; the fixtures use 16 to stay small, which the emulation does not mind.
   (Proving the emulation equals the Triton kernel needs a GPU; none was lent.)
3. `Phi3SmallConfig.dummy_token_indices` builds the cl100k tokenizer to find its
   91 unused ids (100256..100351), which a tiny vocabulary does not have (the mask
   would index past it). It is replaced by the same list (tokenization_phi3_small's
   own `dummy_token_indices`) cut to the ids below vocab_size: none for these fixtures.
   The full list is recorded in the metadata, so a test can hold minislm's to it.

The stored kernel file lacks `blocksparse_flash_attn_padded_fwd`/`_varlen_fwd`, which
the attention layer imports for batched inference with an attention mask; the
reference defines them as functions that refuse to run (they are never called).

Each fixture folder (tests/fixtures/phi3small, tests/fixtures/phi3small_longrope):

    config.json, generation_config.json    hub-style, the real 8k config's keys, shrunk
    tokenizer.json, tokenizer_config.json  a character tokenizer (the real model has none:
                                           its cl100k tokenizer lives in remote code), so
                                           the CLI can be tried on the folder
    model.safetensors (bf16)               random weights saved from the remote model's own
                                           state_dict: its tensor names, lm_head left out
                                           (tied), rotary inv_freq buffers kept
    reference_phi3small.safetensors:
        pattern.blocks         (H, n, n)   uint8    the remote's `_get_sparse_attn_mask` block mask for
                                                    this config ((n, n) with homo_head)
        pattern.real_8k_packed             uint8    (phi3small only) the same for the real 8k config:
                                                    np.packbits of (32, 128, 128)
        case.<c>.input_ids     (T,)        int64
        case.<c>.logit_rows    (k,)        int64    rows kept (every 8th and the last 4)
        case.<c>.logits        (k, V)      float32  the remote model, sparse layers as designed
        case.<c>.dense_logits  (k, V)      float32  the same weights with every layer dense
                                                    (dense_attention_every_n_layers = 1)
        case.<c>.hidden        (L+1, k, D) float32  the residual stream before each layer and
                                                    after the final LayerNorm (output_hidden_states)
        greedy.prompt          (P,)        int64
        greedy.tokens          (N,)        int64    greedy continuation, a full forward per token
        greedy.cached_tokens   (N,)        int64    the remote code's own cached decoding
                                                    (DynamicCache, one token per step)
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from reference_venv import ensure_reference_venv  # tools/reference_venv.py

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE_FILE = "reference_phi3small.safetensors"
REMOTE_FILES = (
    "configuration_phi3_small.py",
    "modeling_phi3_small.py",
    "positional_embedding.py",
    "triton_blocksparse_attention_layer.py",
    "triton_flash_blocksparse_attn.py",
    "tokenization_phi3_small.py",
)
# transformers 4.44: the remote code uses DynamicCache.get_usable_length and
# from_legacy_cache, which later versions removed. triton imports fine on a CPU.
REFERENCE_PACKAGES = ["torch==2.13.0", "transformers==4.44.2", "triton", "einops", "pytest", "safetensors", "numpy"]
SEED = 2323
VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (  # Phi-3-small's own (tokenizer_config.json of the hub repo)
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# The real microsoft/Phi-3-small-8k-instruct config.json, with the sizes each fixture shrinks.
REAL_CONFIG = {
    "architectures": ["Phi3SmallForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
        "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
        "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
    },
    "model_type": "phi3small",
    "attention_dropout_prob": 0.0,
    "blocksparse_block_size": 64,
    "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": 16,
    "blocksparse_triton_kernel_block_size": 64,
    "blocksparse_vert_stride": 8,
    "bos_token_id": 100257,
    "dense_attention_every_n_layers": 2,
    "embedding_dropout_prob": 0.1,
    "eos_token_id": 100257,
    "ff_dim_multiplier": None,
    "ff_intermediate_size": 14336,
    "ffn_dropout_prob": 0.1,
    "gegelu_limit": 20.0,
    "gegelu_pad_to_256": True,
    "hidden_act": "gegelu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_position_embeddings": 8192,
    "mup_attn_multiplier": 1.0,
    "mup_embedding_multiplier": 10.0,
    "mup_use_scaling": True,
    "mup_width_multiplier": 8.0,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pad_sequence_to_multiple_of_64": True,
    "reorder_and_upcast_attn": False,
    "rope_embedding_base": 1000000,
    "rope_position_scale": 1.0,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 100352,
}


def ramp(lo: float, hi: float, n: int) -> list[float]:
    return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)]


# name -> (config overrides, {case: length}, greedy (prompt length, new tokens))
FIXTURE_CONFIGS = {
    # 16-token blocks, 2 local blocks (32 tokens), vertical stride 8 over 4 heads: the
    # per-head step is max(1, int(8 / 4)) = 2, so head h reads the vertical blocks
    # 7 - 2h, 15 - 2h, ... Dense layers 1 and 3, sparse 0 and 2. gegelu_limit 1.5 so
    # the clamp acts on random weights; rope_position_scale 0.75 multiplies positions.
    "phi3small": (
        dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             ff_intermediate_size=64, max_position_embeddings=512, blocksparse_block_size=16,
             blocksparse_triton_kernel_block_size=16, blocksparse_num_local_blocks=2, blocksparse_vert_stride=8,
             gegelu_limit=1.5, rope_position_scale=0.75),
        {"short": 24, "long": 170},
        (120, 40),
    ),
    # Blocks of 32 cut into kernel tiles of 16 (the remote's Kronecker expansion), one
    # local block, every 3rd block for every head (homo_head_pattern), dense layer 2 of
    # 3; one kv head for 4 query heads; the feed-forward size from ff_dim_multiplier
    # (2 * (64 // 3) * 1 = 42, not padded to 256); attention scale 1/sqrt(hd)
    # (mup_use_scaling false); no embedding multiplier (0 turns it off); LongRoPE
    # switching at 96 tokens, where rope_position_scale (2.0) is ignored.
    "phi3small_longrope": (
        dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
             ff_intermediate_size=None, ff_dim_multiplier=1, gegelu_pad_to_256=False, max_position_embeddings=256,
             blocksparse_block_size=32, blocksparse_triton_kernel_block_size=16, blocksparse_num_local_blocks=1,
             blocksparse_vert_stride=3, blocksparse_homo_head_pattern=True, dense_attention_every_n_layers=3,
             mup_use_scaling=False, mup_embedding_multiplier=0.0, mup_width_multiplier=4.0, rope_position_scale=2.0,
             rope_scaling={"type": "longrope", "short_factor": ramp(1.0, 1.5, 8), "long_factor": ramp(1.0, 6.0, 8),
                           "original_max_position_embeddings": 96}),
        {"below": 64, "above": 150},
        (88, 20),  # crosses the original length (96) mid-generation
    ),
}


# ---------------------------------------------------------------- step 1: our side


def write_fixture_folder(name: str) -> dict:
    """config.json, generation_config.json and the tokenizer files; returns config.json
    and, as `sample_ids`, how many ids the tokenizer has besides its special tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from make_vision_fixtures import build_tokenizer

    overrides = FIXTURE_CONFIGS[name][0]
    folder = FIXTURES / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok = build_tokenizer()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer_config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": overrides["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    config = dict(REAL_CONFIG, **overrides, vocab_size=VOCAB_SIZE,
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"])
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return dict(config, sample_ids=tok.get_vocab_size(with_added_tokens=False))


def remote_code_folder(given: Path) -> Path:
    missing = [f for f in REMOTE_FILES if not (given / f).is_file()]
    if missing:
        sys.exit(f"--remote-code {given}: missing {', '.join(missing)}")
    return given


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote-code", type=Path, help="folder with the hub repo's *.py files (required)")
    parser.add_argument("--ref-venv", type=Path, default=Path("/work/venvs/i23-small-ref"))
    parser.add_argument("--run-reference", type=Path, help=argparse.SUPPRESS)  # step 2, inside the reference venv
    args = parser.parse_args()
    if args.run_reference:
        return run_reference(args.run_reference)

    if args.remote_code is None:
        parser.error("--remote-code is required")
    code = remote_code_folder(args.remote_code)
    python = ensure_reference_venv(args.ref_venv, REFERENCE_PACKAGES)
    for i, name in enumerate(FIXTURE_CONFIGS):
        config = write_fixture_folder(name)
        sample_ids = config.pop("sample_ids")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            package = work / "phi3small_reference"
            package.mkdir()
            (package / "__init__.py").write_text("")
            for file in REMOTE_FILES:
                shutil.copy(code / file, package / file)
            _, cases, greedy = FIXTURE_CONFIGS[name]
            job = {
                "name": name, "folder": str(FIXTURES / name), "config": config, "cases": cases,
                "greedy": greedy, "seed": SEED + i, "sample_ids": sample_ids,
                "remote_code": {f: hashlib.sha256((code / f).read_bytes()).hexdigest() for f in REMOTE_FILES},
            }
            (work / "job.json").write_text(json.dumps(job))
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(work))
            subprocess.run([str(python), __file__, "--run-reference", str(work)], check=True, env=env)
        size = sum(p.stat().st_size for p in (FIXTURES / name).iterdir())
        print(f"wrote {FIXTURES / name} ({size / 1024:.0f} KiB)")


# ---------------------------------------------------------------- step 2: the reference


def kernel_definition(ctx, q, k, v, layout_crow_indices, layout_col_indices, sm_scale, BLOCK_M, BLOCK_N,
                      num_warps=None, num_stages=1, inference=None, out=None):
    """What `_fwd_kernel` computes, for `triton_flash_blocksparse_attn._forward`'s arguments.

    Program (m, z*h) handles queries [m*BLOCK_M, (m+1)*BLOCK_M) of head h; it reads the
    key blocks col[h, crow[h, m] : crow[h, m+1]], each BLOCK_N keys, and masks a key
    after the query (`offs_m + PAST_LEN >= start_n + offs_n`, PAST_LEN = keys - queries).
    Its online softmax over those blocks is a softmax over the union of what they allow.
    """
    import torch

    Z, H, q_len, _ = q.shape
    n_ctx = k.shape[2]
    if layout_col_indices.dim() == 1:
        layout_crow_indices = layout_crow_indices[None].expand(H, -1)
        layout_col_indices = layout_col_indices[None].expand(H, -1)
    allowed = torch.zeros(H, q_len, n_ctx, dtype=torch.bool)
    for h in range(H):
        for m in range(-(-q_len // BLOCK_M)):
            rows = slice(m * BLOCK_M, min((m + 1) * BLOCK_M, q_len))
            for i in range(int(layout_crow_indices[h, m]), int(layout_crow_indices[h, m + 1])):
                start_n = int(layout_col_indices[h, i]) * BLOCK_N
                allowed[h, rows, start_n : start_n + BLOCK_N] = True
    past = n_ctx - q_len
    causal = torch.arange(n_ctx)[None, :] <= (past + torch.arange(q_len))[:, None]  # (q_len, n_ctx)
    allowed &= causal[None]
    scores = torch.einsum("zhmd,zhnd->zhmn", q.float(), k.float()) * sm_scale
    probs = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1)
    o = torch.einsum("zhmn,zhnd->zhmd", probs, v.float()).to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, return_attn_probs=False, **kwargs):
    """flash-attention's varlen call, as torch's scaled_dot_product_attention per sequence.
    q (total_q, H, d), kv (total_k, 2, H, d) -> (total_q, H, d). The remote code asks for
    causal only when a sequence's query and key lengths are equal, where flash-attention's
    bottom-right causal mask and SDPA's top-left one are the same."""
    import torch
    import torch.nn.functional as F

    assert dropout_p == 0.0 and not return_attn_probs and not kwargs
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]].transpose(0, 1)  # (H, Tq, d)
        ks = kv[cu_seqlens_k[b] : cu_seqlens_k[b + 1], 0].transpose(0, 1)
        vs = kv[cu_seqlens_k[b] : cu_seqlens_k[b + 1], 1].transpose(0, 1)
        assert not causal or qs.shape[1] == ks.shape[1]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs)


def import_remote_code():
    """The remote package with the three replacements of the module docstring."""
    import importlib

    kernel = importlib.import_module("phi3small_reference.triton_flash_blocksparse_attn")

    def batched_inference_only(*args, **kwargs):
        raise NotImplementedError("batched inference with an attention mask: not used by the fixtures")

    for missing in ("blocksparse_flash_attn_padded_fwd", "blocksparse_flash_attn_varlen_fwd"):
        if not hasattr(kernel, missing):
            setattr(kernel, missing, batched_inference_only)
    kernel._forward = kernel_definition
    modeling = importlib.import_module("phi3small_reference.modeling_phi3_small")
    modeling.is_flash_attention_available = True
    modeling.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    configuration = importlib.import_module("phi3small_reference.configuration_phi3_small")
    tokenization = importlib.import_module("phi3small_reference.tokenization_phi3_small")
    every_dummy_id = tokenization.Phi3SmallTokenizer().dummy_token_indices
    configuration.Phi3SmallConfig.dummy_token_indices = property(
        lambda self: [i for i in every_dummy_id if i < self.vocab_size]
    )
    return modeling, configuration, every_dummy_id


def randomize(model, generator) -> None:
    """Biases near 0, LayerNorm gains near 1, matrices with unit-variance outputs; the
    embedding (also the tied output layer) at std 2 / mup_embedding_multiplier (2 without
    one): large enough that the logits, divided by mup_width_multiplier, spread over a
    unit or more (argmax ties are rare), small enough that the scaled embedding does not
    drown what attention adds to the residual stream (and so the sparse pattern's effect).
    The two projections back into the residual stream (dense, down_proj) are 16x larger:
    with a tied output layer, a residual stream dominated by the token's own embedding
    makes the model predict that token again and again, and a greedy continuation
    that repeats one token tests little."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("embed_tokens.weight"):
                multiplier = model.config.mup_embedding_multiplier
                std = 2.0 / multiplier if multiplier is not None and multiplier > 0 else 2.0
                p.copy_(std * torch.randn(p.shape, generator=generator))
            else:
                gain = 16.0 if name.endswith(("self_attn.dense.weight", "mlp.down_proj.weight")) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)


def run_reference(work: Path) -> None:
    """Runs inside the reference venv: torch, transformers 4.44, triton and the remote
    code; nothing of minislm."""
    import numpy as np
    import torch
    import transformers
    import triton
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import load_file, save_file

    job = json.loads((work / "job.json").read_text())
    folder = Path(job["folder"])
    modeling, configuration, every_dummy_id = import_remote_code()
    config = configuration.Phi3SmallConfig.from_pretrained(folder)
    torch.manual_seed(job["seed"])
    model = modeling.Phi3SmallForCausalLM(config).float().eval()
    randomize(model, torch.Generator().manual_seed(job["seed"]))

    # Saved as the remote model's state_dict names it, in bf16 as the hub files are;
    # the tied lm_head is left out, as save_pretrained does.
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"], (missing, unexpected)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied (PretrainedConfig's default)

    dense_config = configuration.Phi3SmallConfig.from_pretrained(folder, dense_attention_every_n_layers=1)
    dense = modeling.Phi3SmallForCausalLM(dense_config).float().eval()
    dense.load_state_dict(loaded, strict=False)
    sparse_layers = [i for i, layer in enumerate(model.model.layers) if layer.self_attn.blocksparse]
    assert sparse_layers and not any(layer.self_attn.blocksparse for layer in dense.model.layers)

    tensors = {"pattern.blocks": block_pattern(config)}
    if job["name"] == "phi3small":  # the real model's pattern, from the real config.json's settings
        real = configuration.Phi3SmallConfig(**{k: v for k, v in REAL_CONFIG.items() if k not in ("auto_map",)})
        tensors["pattern.real_8k_packed"] = np.packbits(block_pattern(real))

    rng = np.random.default_rng(job["seed"])
    vocab = job["sample_ids"]  # ids the character tokenizer knows, special tokens aside
    for case, length in job["cases"].items():
        ids = rng.integers(0, vocab, length).astype(np.int64)
        rows = sorted(set(range(0, length, 8)) | set(range(length - 4, length)))
        with torch.no_grad():
            out = model(torch.from_numpy(ids)[None], output_hidden_states=True)
            dense_logits = dense(torch.from_numpy(ids)[None]).logits[0]
        prefix = f"case.{case}."
        tensors[prefix + "input_ids"] = ids
        tensors[prefix + "logit_rows"] = np.array(rows, dtype=np.int64)
        tensors[prefix + "logits"] = np.ascontiguousarray(out.logits[0, rows].numpy(), dtype=np.float32)
        tensors[prefix + "dense_logits"] = np.ascontiguousarray(dense_logits[rows].numpy(), dtype=np.float32)
        hidden = torch.stack(out.hidden_states)[:, 0, rows]  # (L+1, k, D)
        tensors[prefix + "hidden"] = np.ascontiguousarray(hidden.numpy(), dtype=np.float32)
        gap = float((out.logits[0] - dense_logits).abs().max())
        print(f"{job['name']}/{case}: {length} ids, sparse layers {sparse_layers}, |sparse - dense| max {gap:.3g}")

    prompt_len, new_tokens = job["greedy"]
    prompt = rng.integers(0, vocab, prompt_len).astype(np.int64)
    stop = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    tensors["greedy.prompt"] = prompt
    tensors["greedy.tokens"] = greedy_full_forward(model, prompt, new_tokens, stop)
    tensors["greedy.cached_tokens"] = greedy_cached(model, prompt, len(tensors["greedy.tokens"]))
    agree = (tensors["greedy.tokens"] == tensors["greedy.cached_tokens"]).all()
    print(f"{job['name']}: greedy {tensors['greedy.tokens'].tolist()}")
    print(f"{job['name']}: greedy {prompt_len}+{len(tensors['greedy.tokens'])}, remote cached decoding "
          f"{'agrees' if agree else 'DIFFERS'} with full forwards")

    metadata = {
        "cases": json.dumps(job["cases"]),
        "seed": str(job["seed"]),
        "sparse_layers": json.dumps(sparse_layers),
        "dummy_token_indices": json.dumps(every_dummy_id),
        "remote_code_sha256": json.dumps(job["remote_code"]),
        "replacements": "flash-attn varlen -> torch SDPA; triton _forward -> kernel_definition (CSR tiles, causal); "
                        "dummy_token_indices cut to vocab_size",
        "versions": json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                "triton": triton.__version__}),
    }
    save_numpy(tensors, folder / REFERENCE_FILE, metadata=metadata)
    for written in (folder / "model.safetensors", folder / REFERENCE_FILE):
        written.chmod(0o644)  # safetensors writes through a private temporary file


def block_pattern(config):
    """The remote code's own block pattern for `config`: `_get_sparse_attn_mask`'s block mask
    over max_position_embeddings, (H, blocks, blocks) uint8 (homo_head: one head's, (blocks, blocks))."""
    import sys

    import numpy as np
    import torch

    kernel = sys.modules["phi3small_reference.triton_flash_blocksparse_attn"]
    _, pattern, _ = kernel._get_sparse_attn_mask(
        config.num_attention_heads, config.max_position_embeddings, config.max_position_embeddings, torch.float32, "cpu",
        BLOCK=config.blocksparse_block_size, local_blocks=config.blocksparse_num_local_blocks,
        vert_stride=config.blocksparse_vert_stride, homo_head=config.blocksparse_homo_head_pattern)
    return pattern.numpy().astype(np.uint8)


def greedy_full_forward(model, prompt, n: int, stop: set):
    """The definition a cached decoder must reproduce: each token from a full forward."""
    import numpy as np
    import torch

    sequence, new = torch.from_numpy(prompt)[None], []
    for _ in range(n):
        with torch.no_grad():
            token = int(model(sequence).logits[0, -1].argmax())
        new.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        if token in stop:
            break
    return np.array(new, dtype=np.int64)


def greedy_cached(model, prompt, n: int):
    """The remote code's own decoding: one prefill, then one token per forward through its
    DynamicCache (its sparse layers then read the last block row of the layout)."""
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(prompt)[None], use_cache=True)
        new = [int(out.logits[0, -1].argmax())]
        while len(new) < n:
            out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            new.append(int(out.logits[0, -1].argmax()))
    return np.array(new, dtype=np.int64)


if __name__ == "__main__":
    main()
