"""Golden fixtures for phi3_v (Phi-3-vision), from the hub's own remote code.

    python tools/make_vision_fixtures.py --remote-code DIR   # rewrites tests/fixtures/phi3_v/

Phi-3-vision is not part of transformers: its model, image embedding, image
processor and processor are Python files in the hub repository
(microsoft/Phi-3-vision-128k-instruct), run with `trust_remote_code`. They need an
older transformers (4.43) and torchvision, so this tool runs them in a separate
virtual environment it creates (default /work/vision-ref-venv, outside the repo):

    torch==2.14.1 torchvision==0.29.1 transformers==4.43.4

The reference code is read at run time, never committed: pass a folder holding
`configuration_phi3_v.py`, `modeling_phi3_v.py`, `image_embedding_phi3_v.py`,
`image_processing_phi3_v.py` and `processing_phi3_v.py` (a clone of the hub repo,
or a public mirror of it), or let the tool download those five files from the hub
(network needed).

What it does, in two processes:

1. (this venv, with minislm) a tiny phi3_v folder in tests/fixtures/phi3_v:
   config.json (the text decoder shrunk to 64 wide; CLIP keeps its real width 1024
   and image size 336, which the reference code hard-codes, but only 2 blocks and an
   MLP of 256), tokenizer files with Phi-3-vision's chat template, three synthetic
   test images (RGB, RGBA portrait, a 20x12 palette image). The weights,
   model.safetensors (~20 MB), are NOT kept in the repo: `write_hashed_checkpoint`
   makes them from a seed, bit for bit the same on every machine, and the tests
   rebuild them; their SHA-256 is recorded.
2. (the reference venv, without minislm) the remote code, on CPU in float32 with
   eager attention: its processor turns each case's chat prompt and images into
   ids and pixel values, its model gives image features and logits, and a full
   forward per token gives the greedy continuation. Written to
   tests/fixtures/phi3_v/reference_vision.safetensors:

    case.<c>.input_ids     (T,)           int64    ids; image k's placeholders are -k
    case.<c>.image_sizes   (n, 2)         int64    padded (H, W) of each image
    case.<c>.tower         (views, 5, C)  float32  penultimate CLIP state at PATCHES, real views only
    case.<c>.merged        (T, D)         float32  the decoder's input: at the placeholders (ids < 0)
                                                   the projected image features, elsewhere token embeddings
    case.<c>.logit_rows    (k,)           int64    positions whose logits are kept
    case.<c>.logits        (k, V)         float32
    one.pixel_rows         (5, 3, 42, 336) float32 every 8th row of the 5 views of case "one"
    greedy.tokens          (N,)           int64    greedy continuation of case "one" (full forwards)

The metadata holds the cases (messages, image files, num_crops), the versions used,
the SHA-256 of the checkpoint and of each reference source file.
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
FIXTURE = ROOT / "tests" / "fixtures" / "phi3_v"
REFERENCE_FILE = "reference_vision.safetensors"
REMOTE_FILES = (
    "configuration_phi3_v.py",
    "modeling_phi3_v.py",
    "image_embedding_phi3_v.py",
    "image_processing_phi3_v.py",
    "processing_phi3_v.py",
)
HUB_REPO = "microsoft/Phi-3-vision-128k-instruct"
REFERENCE_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "transformers==4.43.4", "safetensors", "pillow", "numpy"]
SEED = 1234
PATCHES = [0, 1, 24, 287, 575]  # which of the 576 patch features to keep per view
GREEDY_TOKENS = 20
CHAT_TEMPLATE = (  # Phi-3-vision's own (tokenizer_config.json of the hub repo)
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
VOCAB_SIZE = 384
CASES = {
    # one image, 4 crops: a 2x2 grid; its greedy continuation crosses LongRoPE's switch
    "one": {"messages": [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}],
            "images": ["landscape.png"], "num_crops": 4},
    # two images, 6 crops: a 3x2 grid (portrait) and a 2x3 grid; past the switch from the start
    "two": {"messages": [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nCompare the two pictures."}],
            "images": ["portrait_rgba.png", "tiny_palette.png"], "num_crops": 6},
}


# ---------------------------------------------------------------- step 1: our side


def build_tokenizer():
    """A SentencePiece-style character tokenizer with Phi-3's special tokens and its
    machinery: "▁" for spaces, byte fallback, the same decoder chain."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    tok = Tokenizer(BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>"] + SPECIAL_TOKENS)
    return tok


def make_images(folder: Path) -> None:
    """Three small synthetic pictures: smooth shapes (PNG keeps them small), each in a
    different mode the processor must turn into RGB."""
    import numpy as np
    from PIL import Image

    def picture(w, h, phase):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 127 + 120 * np.sin(x / 23 + phase)
        g = 127 + 120 * np.cos(y / 17 - phase)
        b = 255 * ((x - w / 3) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2)
        return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)

    Image.fromarray(picture(500, 300, 0.0)).save(folder / "landscape.png", optimize=True)
    rgba = np.concatenate([picture(300, 700, 1.0), np.full((700, 300, 1), 128, np.uint8)], -1)
    rgba[:100, :, 3] = 0  # a transparent band: alpha is dropped, not blended
    Image.fromarray(rgba, "RGBA").save(folder / "portrait_rgba.png", optimize=True)
    Image.fromarray(picture(20, 12, 2.0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
        folder / "tiny_palette.png"
    )


def case_length(tok, case: dict) -> int:
    """How many ids case `case` becomes (text chunks each with BOS, plus placeholders)."""
    import re

    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from PIL import Image

    from minislm.vision.image import num_image_tokens, padded_size

    text = ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE).render(messages=case["messages"], add_generation_prompt=True)
    chunks = re.split(r"<\|image_\d+\|>", text)
    n = sum(1 + len(tok.encode(c, add_special_tokens=False).ids) for c in chunks)
    for name in case["images"]:
        with Image.open(FIXTURE / name) as image:
            n += num_image_tokens(*padded_size(*image.size, case["num_crops"]))
    return n


def write_fixture_folder(folder: Path) -> dict:
    """Everything but the weights; returns config.json as a dict."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    make_images(folder)
    prompt_len = case_length(tok, CASES["one"])
    head_dim = 16
    config = {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 4096,
        # case "one"'s greedy continuation crosses it after 6 tokens
        "original_max_position_embeddings": prompt_len + 6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "su",
            "short_factor": [round(1 + 0.5 * i / 7, 6) for i in range(head_dim // 2)],
            "long_factor": [round(1 + 5 * i / 7, 6) for i in range(head_dim // 2)],
        },
        "rms_norm_eps": 1e-5,
        "sliding_window": 262144,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "embd_layer": {
            "embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
            "use_hd_transform": True, "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model", "num_img_tokens": 144,
            # minislm's keys for small test towers (the reference tool patches the same sizes in)
            "num_hidden_layers": 2, "intermediate_size": 256, "num_attention_heads": 16,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({"num_crops": 4, "num_img_tokens": 144}, indent=2) + "\n")
    return config


def remote_code_folder(given: Path | None, work: Path) -> Path:
    if given is not None:
        missing = [f for f in REMOTE_FILES if not (given / f).is_file()]
        if missing:
            sys.exit(f"--remote-code {given}: missing {', '.join(missing)}")
        return given
    from huggingface_hub import hf_hub_download

    for name in REMOTE_FILES:
        shutil.copy(hf_hub_download(HUB_REPO, name), work / name)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remote-code", type=Path, help="folder with the hub repo's *_phi3_v.py files")
    parser.add_argument("--ref-venv", type=Path, default=Path("/work/vision-ref-venv"))
    parser.add_argument("--run-reference", type=Path, help=argparse.SUPPRESS)  # step 2, inside the reference venv
    args = parser.parse_args()
    if args.run_reference:
        return run_reference(args.run_reference)

    from minislm.bench.random_checkpoint import write_hashed_checkpoint

    config = write_fixture_folder(FIXTURE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        code = remote_code_folder(args.remote_code, work)
        package = work / "phi3v_reference"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in REMOTE_FILES:
            shutil.copy(code / name, package / name)
        model_dir = work / "model"
        shutil.copytree(FIXTURE, model_dir)
        checkpoint_sha = write_hashed_checkpoint(model_dir, config, SEED)
        job = {
            "model_dir": str(model_dir), "cases": CASES, "patches": PATCHES, "greedy_tokens": GREEDY_TOKENS,
            "seed": SEED, "checkpoint_sha256": checkpoint_sha,
            "remote_code": {n: hashlib.sha256((code / n).read_bytes()).hexdigest() for n in REMOTE_FILES},
        }
        (work / "job.json").write_text(json.dumps(job))
        python = ensure_reference_venv(args.ref_venv, REFERENCE_PACKAGES)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(work))
        subprocess.run([str(python), __file__, "--run-reference", str(work)], check=True, env=env)
        shutil.copyfile(work / REFERENCE_FILE, FIXTURE / REFERENCE_FILE)
    total = sum(p.stat().st_size for p in FIXTURE.iterdir())
    print(f"wrote {FIXTURE} ({total / 2**20:.2f} MiB; the checkpoint, {checkpoint_sha[:12]}..., is rebuilt by the tests)")


# ---------------------------------------------------------------- step 2: the reference


def run_reference(work: Path) -> None:
    """Runs inside the reference venv: only torch, transformers 4.43, torchvision and the
    remote code; nothing of minislm."""
    import numpy as np
    import PIL
    import torch
    import torchvision
    import transformers
    from PIL import Image
    from safetensors.numpy import save_file
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    job = json.loads((work / "job.json").read_text())
    model_dir = Path(job["model_dir"])
    raw = json.loads((model_dir / "config.json").read_text())

    from phi3v_reference import image_embedding_phi3_v as image_embedding

    # The remote code hard-codes ViT-L/14-336; shrink only what the fixture shrinks.
    clip = image_embedding.CLIP_VIT_LARGE_PATCH14_336_CONFIG
    for key in ("num_hidden_layers", "intermediate_size", "num_attention_heads"):
        setattr(clip, key, raw["img_processor"][key])
    from phi3v_reference.configuration_phi3_v import Phi3VConfig
    from phi3v_reference.image_processing_phi3_v import Phi3VImageProcessor
    from phi3v_reference.modeling_phi3_v import Phi3VForCausalLM
    from phi3v_reference.processing_phi3_v import Phi3VProcessor

    config = Phi3VConfig.from_pretrained(model_dir)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config).float().eval()
    state = {k: v.float() for k, v in load_file(model_dir / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The image embedding shares embed_tokens as `wte`; the hub file does not store it twice.
    assert unexpected == [] and missing == ["model.vision_embed_tokens.wte.weight"], (missing, unexpected)
    assert model.model.vision_embed_tokens.wte is model.model.embed_tokens
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    embedding = model.model.vision_embed_tokens

    tensors, cases = {}, {}
    for name, case in job["cases"].items():
        processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=case["num_crops"], num_img_tokens=144), tokenizer)
        prompt = tokenizer.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
        images = [Image.open(model_dir / f) for f in case["images"]]
        inputs = processor(prompt, images, return_tensors="pt")
        ids, pixels, sizes = inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
        sizes = torch.as_tensor(np.asarray(sizes, dtype=np.int64))
        with torch.no_grad():
            views = pixels.flatten(0, 1)  # (images * (num_crops + 1), 3, 336, 336), zero-padded
            tower = embedding.get_img_features(views).reshape(pixels.shape[0], pixels.shape[1], 576, -1)
            merged = embedding(ids.clone(), pixel_values=pixels, image_sizes=sizes)[0]  # clone: it edits ids in place
            logits = model(input_ids=ids.clone(), pixel_values=pixels, image_sizes=sizes).logits[0]
        real_views = [1 + (h // 336) * (w // 336) for h, w in sizes.tolist()]
        placeholders = (ids[0] < 0).numpy()
        T = ids.shape[1]
        rows = sorted(set(range(0, T, 16)) | set(range(max(0, T - 24), T)) | set(np.flatnonzero(placeholders)[::97].tolist()))
        prefix = f"case.{name}."
        tensors[prefix + "input_ids"] = ids[0].numpy().astype(np.int64)
        tensors[prefix + "image_sizes"] = sizes.numpy().astype(np.int64)
        tensors[prefix + "tower"] = np.concatenate(
            [tower[i, :n][:, job["patches"]].numpy() for i, n in enumerate(real_views)]
        ).astype(np.float32)
        tensors[prefix + "merged"] = merged.numpy().astype(np.float32)
        tensors[prefix + "logit_rows"] = np.array(rows, dtype=np.int64)
        tensors[prefix + "logits"] = logits[rows].numpy().astype(np.float32)
        if name == "one":
            tensors["one.pixel_rows"] = np.ascontiguousarray(pixels[0, : real_views[0], :, ::8].numpy(), dtype=np.float32)
            stop = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
            tensors["greedy.tokens"] = greedy(model, ids, pixels, sizes, job["greedy_tokens"], set(stop))
            switch = raw["original_max_position_embeddings"]
            assert T <= switch < T + len(tensors["greedy.tokens"]), "the greedy run should cross LongRoPE's switch"
        cases[name] = dict(case, prompt=prompt, tokens=T, image_tokens=int(placeholders.sum()), views=real_views)
        print(f"{name}: {T} ids, {int(placeholders.sum())} image tokens, image sizes {sizes.tolist()}, views {real_views}")

    metadata = {
        "cases": json.dumps(cases),
        "patches": json.dumps(job["patches"]),
        "seed": str(job["seed"]),
        "checkpoint_sha256": job["checkpoint_sha256"],
        "remote_code_sha256": json.dumps(job["remote_code"]),
        "versions": json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                                "transformers": transformers.__version__, "pillow": PIL.__version__}),
    }
    save_file(tensors, work / REFERENCE_FILE, metadata=metadata)


def greedy(model, ids, pixels, sizes, n: int, stop: set) -> "np.ndarray":
    """The reference's greedy continuation, each token from a full forward over the whole
    sequence with the image (the definition a cached decoder must reproduce), ending
    after a generation_config.json stop id."""
    import numpy as np
    import torch

    sequence, new = ids.clone(), []
    for _ in range(n):
        with torch.no_grad():
            token = int(model(input_ids=sequence.clone(), pixel_values=pixels, image_sizes=sizes).logits[0, -1].argmax())
        new.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        if token in stop:
            break
    return np.array(new, dtype=np.int64)


if __name__ == "__main__":
    main()
