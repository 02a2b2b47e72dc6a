"""Golden fixtures for Phi-4-multimodal, from transformers' own `phi4_multimodal`.

    python tools/make_phi4mm_fixtures.py --convert-script PATH   # rewrites tests/fixtures/phi4mm/

transformers implements Phi-4-multimodal natively (Phi4MultimodalForCausalLM, its
image processor and feature extractor); its adapters load through PEFT. This tool
runs them offline on CPU, in float32 with eager attention, in a separate virtual
environment (default /work/venvs/i25-ref, outside the repo):

    torch==2.14.1 torchvision==0.29.1 transformers==5.25.0 peft==0.21.2

Two processes:

1. (this venv, with minislm) tests/fixtures/phi4mm/: a tiny checkpoint in the HUB's
   layout (model_type "phi4mm", what microsoft/Phi-4-multimodal-instruct's files and
   its remote code use): config.json (decoder 64 wide, 2 layers, partial rotary,
   LongRoPE, tied embeddings; SigLIP 32 wide with 3 blocks at the real 448-pixel,
   14-pixel-patch geometry; a Conformer 32 wide with 2 blocks, the real subsampling
   and bias table; both LoRA adapters at their real ranks 256 and 320), a byte-level
   BPE tokenizer (the first 1000 ranks of o200k_base, Phi-4-mini's vocabulary, plus
   the special tokens), two synthetic pictures and a 16 kHz recording. The weights
   (model.safetensors, bf16, with `base_layer` / `lora_A.vision` ... names) are not in
   the repo: minislm.bench.random_checkpoint rebuilds them from a seed.
2. (the reference venv, without minislm) transformers' conversion script,
   convert_phi4_multimodal_weights_to_hf.py (from transformers' repository, not its
   wheel: pass its path), converts that checkpoint: `convert_and_write_model` and
   `extract_adapters_data` run unmodified, except that the script's vision-config
   class is given the tiny tower's sizes and both config classes the tiny
   vocabulary's placeholder ids (the hub config has no vision sizes, and the script
   keeps only `crop_size` of it). `convert_and_save_processor` is not run: it needs the
   hub's remote processor classes; the processor is built from transformers' own
   classes instead. Then transformers' model runs every case with PEFT's adapter for
   it (vision for images, speech for audio alone, none for text).

Written to tests/fixtures/phi4mm/reference_phi4mm.safetensors, per case c:

    <c>.input_ids        (T,)         the processor's ids (placeholders as token ids)
    <c>.logit_rows       (k,)         positions whose logits are kept
    <c>.logits           (k, V)
    <c>.embeds_rows      (m,)         positions whose decoder input is kept
    <c>.embeds           (m, D)       the decoder's input (embed_tokens_extend's output)
    <c>.greedy           (20,)        greedy continuation, each token from a full forward
    <c>.image<k>.global_rows   (3, 14, 448)  every 32nd row of the global view
    <c>.image<k>.crops_sha256  (32,) uint8  SHA-256 of the crops' float32 bytes
    <c>.image<k>.mask    (views, 32, 32) uint8
    <c>.image<k>.tower   (views, 6, C)  SigLIP's hidden_states[-2] at PATCHES
    <c>.image<k>.tokens  (n/4, C->D)  every 4th projected image token
    <c>.audio<k>.features (T, 80)     the feature extractor's log-mel frames
    <c>.audio<k>.states  (T', Da)     the Conformer's output
    <c>.audio<k>.tokens  (T', D)      after the projector the case uses
    long.features_rows, long.states   the recording tiled 15 times (45 s, two 500-frame chunks):
                                      every 16th feature frame, every encoder state

and tests/fixtures/phi4mm/converted/: the script's config.json and the two
adapter_config.json files, with the name and SHA-256 of every tensor the script
wrote (metadata "converted_tensors"), so the tests can rebuild the converted
folder from the hub checkpoint and know it is the script's.
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
FIXTURE = ROOT / "tests" / "fixtures" / "phi4mm"
REFERENCE_FILE = "reference_phi4mm.safetensors"
REFERENCE_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "transformers==5.25.0", "peft==0.21.2",
                      "safetensors", "pillow", "numpy"]
SEED = 4242
PATCHES = [0, 1, 31, 32, 600, 1023]  # which of the 1024 patch features to keep per view
GREEDY_TOKENS = 20
RANKS = 1000  # the first o200k_base ranks kept: every single byte and the commonest merges
SPECIAL = ["<|endoftext|>", "<|endoftext10|>", "<|endoftext11|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 1024  # 1000 ranks, 7 specials, padding rows
CHAT_TEMPLATE = (  # Phi-4-mini's (tests/fixtures/chat_templates.json), which Phi-4-multimodal's repository carries too
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
    "'<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
TOWER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2}
CASES = {
    "image": {"text": "<|image_1|>What is shown in this picture?", "images": ["landscape.png"], "audios": []},
    "audio": {"text": "<|audio_1|>Transcribe the audio clip into text.", "images": [], "audios": ["speech.wav"]},
    "both": {"text": "<|image_1|><|audio_1|>Answer the spoken question about the picture.",
             "images": ["portrait_rgba.png"], "audios": ["speech.wav"]},
    "text": {"text": "Tell me a story about a lighthouse.", "images": [], "audios": []},
}
LONG_REPEATS = 15


# ---------------------------------------------------------------- step 1: our side


def build_tokenizer():
    """Byte-level BPE on the first RANKS ranks of o200k_base (tests/fixtures/tiktoken),
    Phi-4-mini's split pattern, the special tokens at ids 1000.."""
    from minislm.tiktoken_bpe import O200K_PATTERN, read_ranks, tokenizer_from_ranks

    ranks = {t: r for t, r in read_ranks(ROOT / "tests/fixtures/tiktoken/o200k_base.tiktoken.gz").items() if r < RANKS}
    assert len([t for t in ranks if len(t) == 1]) == 256, "every byte must be a token"
    return tokenizer_from_ranks(ranks, O200K_PATTERN, {t: RANKS + i for i, t in enumerate(SPECIAL)})


def make_images(folder: Path) -> None:
    """Two synthetic pictures: a 500x300 RGB landscape (1x2 crops, the second padded)
    and a 300x700 RGBA portrait with a transparent band (blended onto white)."""
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
    rgba[:100, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "portrait_rgba.png", optimize=True)


def make_audio(folder: Path) -> None:
    """speech.wav: 3 s of 16 kHz mono 16-bit PCM, a vowel-like buzz gliding in pitch
    with two bursts of noise (consonants) and a pause."""
    import wave

    import numpy as np

    rate, n = 16000, 48000
    t = np.arange(n) / rate
    pitch = 120 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    noise = np.random.default_rng(7).standard_normal(n)
    bursts = ((t > 0.9) & (t < 1.05)) | ((t > 2.1) & (t < 2.2))
    signal = np.where(bursts, 0.3 * noise, 0.25 * voiced)
    signal[(t > 1.5) & (t < 1.75)] = 0.0
    pcm = np.round(np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(folder / "speech.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def write_fixture_folder(folder: Path) -> dict:
    """Everything but the weights; returns config.json as a dict."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {"image_token": "<|endoftext10|>", "audio_token": "<|endoftext11|>"},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    make_images(folder)
    make_audio(folder)
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    config = {
        "architectures": ["Phi4MMForCausalLM"],
        "model_type": "phi4mm",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "audio_processor": {
            "config": {
                "activation": "swish",
                "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
                "attention_dim": 32,
                "attention_heads": 2,
                "batch_norm": False,
                "bias_in_glu": True,
                "causal": True,
                "chunk_size": -1,
                "cnn_layer_norm": True,
                "conv_activation": "swish",
                "conv_glu_type": "swish",
                "depthwise_multiplier": 1,
                "depthwise_seperable_out_channel": 32,
                "dropout_rate": 0.0,
                "encoder_embedding_config": {"input_size": 80},
                "ext_pw_kernel_size": 1,
                "ext_pw_out_channel": 32,
                "input_layer": "nemo_conv",
                "input_size": 80,
                "kernel_size": 3,
                "left_chunk": 18,
                "linear_units": 48,
                "nemo_conv_settings": {"conv_channels": 8},
                "num_blocks": 2,
                "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"},
                "time_reduction": 8,
            },
            "name": "cascades",
        },
        "bos_token_id": ids["<|endoftext|>"],
        "embd_layer": {
            "audio_embd_layer": {
                "compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                "enable_gradient_checkpointing": True, "projection_cls": "mlp",
                "use_conv_downsample": False, "use_qformer": False,
            },
            "embedding_cls": "image_audio",
            "image_embd_layer": {
                "crop_size": 448, "embedding_cls": "tune_image", "enable_gradient_checkpointing": True,
                "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True,
            },
        },
        "embd_pdrop": 0.0,
        "eos_token_id": ids["<|endoftext|>"],
        "full_attn_mod": 1,
        "hidden_act": "silu",
        "hidden_size": 64,
        # minislm's keys for a small SigLIP tower (hub files have null: the remote code hard-codes
        # SigLIP-so400m); the reference tool gives transformers the same sizes
        "img_processor": dict(TOWER),
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "interpolate_factor": 1,
        "lm_head_bias": False,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        # the image case's greedy continuation crosses it (its prompt is 737 tokens)
        "original_max_position_embeddings": 740,
        "pad_token_id": ids["<|endoftext|>"],
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0, 1.9, 3.1, 4.4, 5.2, 6.0],
            "short_factor": [1.0, 1.05, 1.1, 1.15, 1.2, 1.25],
            "type": "longrope",
        },
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "speech_lora": {"dp": 0.01, "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 640, "r": 320},
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "use_cache": True,
        "vision_lora": {"dp": 0.0, "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
                        "lora_alpha": 512, "r": 256},
        "vocab_size": VOCAB_SIZE,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # the hub's preprocessor_config.json, without its auto_map to the remote processor classes
    preprocessor = {"audio_compression_rate": 8, "audio_downsample_rate": 1, "audio_feat_stride": 1, "dynamic_hd": 36}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert-script", type=Path, required=True,
                        help="transformers' src/transformers/models/phi4_multimodal/convert_phi4_multimodal_weights_to_hf.py")
    parser.add_argument("--ref-venv", type=Path, default=Path("/work/venvs/i25-ref"))
    parser.add_argument("--run-reference", type=Path, help=argparse.SUPPRESS)  # step 2, inside the reference venv
    args = parser.parse_args()
    if args.run_reference:
        return run_reference(args.run_reference, args.convert_script)
    if not args.convert_script.is_file():
        sys.exit(f"--convert-script {args.convert_script}: no such file")

    from minislm.bench.random_checkpoint import write_hashed_checkpoint

    config = write_fixture_folder(FIXTURE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "hub"
        shutil.copytree(FIXTURE, model_dir)
        checkpoint_sha = write_hashed_checkpoint(model_dir, config, SEED)
        job = {
            "model_dir": str(model_dir), "cases": CASES, "patches": PATCHES, "greedy_tokens": GREEDY_TOKENS,
            "seed": SEED, "checkpoint_sha256": checkpoint_sha, "tower": TOWER, "long_repeats": LONG_REPEATS,
            "convert_script_sha256": hashlib.sha256(args.convert_script.read_bytes()).hexdigest(),
        }
        (work / "job.json").write_text(json.dumps(job))
        python = ensure_reference_venv(args.ref_venv, REFERENCE_PACKAGES)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
        subprocess.run([str(python), __file__, "--convert-script", str(args.convert_script.resolve()),
                        "--run-reference", str(work)], check=True, env=env)
        shutil.copyfile(work / REFERENCE_FILE, FIXTURE / REFERENCE_FILE)
        converted = FIXTURE / "converted"
        converted.mkdir()
        shutil.copyfile(work / "converted" / "config.json", converted / "config.json")
        for adapter in ("vision-lora", "speech-lora"):
            (converted / adapter).mkdir()
            shutil.copyfile(work / "converted" / adapter / "adapter_config.json", converted / adapter / "adapter_config.json")
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    print(f"wrote {FIXTURE} ({total / 2**20:.2f} MiB; the checkpoint, {checkpoint_sha[:12]}..., is rebuilt by the tests)")


# ---------------------------------------------------------------- step 2: the reference


def load_convert_script(path: Path, job: dict, ids: dict):
    """transformers' conversion script as a module, its two config classes given the
    tiny model's sizes and placeholder ids (nothing else of it is touched)."""
    import functools
    import importlib.util

    import transformers

    spec = importlib.util.spec_from_file_location("convert_phi4_multimodal_weights_to_hf", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.Phi4MultimodalVisionConfig = functools.partial(
        transformers.Phi4MultimodalVisionConfig, **job["tower"], image_token_id=ids["image"])
    hub = json.loads((Path(job["model_dir"]) / "config.json").read_text())
    script.Phi4MultimodalAudioConfig = functools.partial(
        transformers.Phi4MultimodalAudioConfig, audio_token_id=ids["audio"],
        # the hub spells it depthwise_seperable_out_channel; transformers reads the right spelling
        depthwise_separable_out_channel=hub["audio_processor"]["config"]["depthwise_seperable_out_channel"])
    return script


def read_wav(path: Path):
    """16-bit PCM mono -> float32 samples / 32768 (stdlib wave: no minislm, no soundfile)."""
    import wave

    import numpy as np

    with wave.open(str(path), "rb") as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2 and f.getframerate() == 16000
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / np.float32(32768)


def run_reference(work: Path, convert_script: Path) -> None:
    """Runs inside the reference venv: torch, torchvision, transformers, peft; nothing of minislm."""
    import numpy as np
    import peft
    import PIL
    import torch
    import torchvision
    import transformers
    from peft import PeftModel
    from PIL import Image
    from safetensors.numpy import save_file
    from safetensors.torch import load_file
    from transformers import (AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM,
                              Phi4MultimodalImageProcessor, Phi4MultimodalProcessor)

    torch.manual_seed(0)
    job = json.loads((work / "job.json").read_text())
    hub_dir = Path(job["model_dir"])
    tokenizer_dir = work / "tokenizer"  # without config.json: AutoTokenizer does not know model_type phi4mm
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hub_dir / name, tokenizer_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"image": tokenizer.convert_tokens_to_ids("<|endoftext10|>"), "audio": tokenizer.convert_tokens_to_ids("<|endoftext11|>")}
    assert tokenizer.image_token_id == ids["image"] and tokenizer.audio_token_id == ids["audio"], "extra_special_tokens"

    # 1. transformers' conversion of the hub checkpoint
    conv_dir = work / "converted"
    script = load_convert_script(convert_script, job, ids)
    script.convert_and_write_model(str(hub_dir), str(conv_dir))
    script.extract_adapters_data(str(hub_dir), str(conv_dir))
    converted_tensors = {}
    for file in [conv_dir / "model.safetensors", conv_dir / "vision-lora/adapter_model.safetensors",
                 conv_dir / "speech-lora/adapter_model.safetensors"]:
        for name, tensor in load_file(file).items():
            key = f"{file.parent.name}/{name}" if file.parent != conv_dir else name
            converted_tensors[key] = hashlib.sha256(tensor.view(torch.uint16).numpy().tobytes()).hexdigest()

    processor = Phi4MultimodalProcessor(image_processor=Phi4MultimodalImageProcessor(),
                                        audio_processor=Phi4MultimodalFeatureExtractor(), tokenizer=tokenizer)
    model = Phi4MultimodalForCausalLM.from_pretrained(conv_dir, dtype=torch.float32, attn_implementation="eager").eval()
    V = model.config.vocab_size

    # 2. PEFT's adapters, checked to hold the files' values (see `adapters_loaded`)
    notes = {}
    peft_model = PeftModel.from_pretrained(model, conv_dir / "vision-lora", adapter_name="vision")
    peft_model.load_adapter(conv_dir / "speech-lora", adapter_name="speech")
    if not adapters_loaded(peft_model, conv_dir):
        notes["peft_prefix"] = ("PeftModel.from_pretrained / load_adapter (peft 0.21.2) ignored the adapter files "
                                "extract_adapters_data writes (names without 'base_model.model.'): lora_B stayed "
                                "zero; the reference loads copies with PEFT's prefix")
        for adapter in ("vision", "speech"):
            folder = work / f"peft-{adapter}-lora"
            folder.mkdir()
            shutil.copyfile(conv_dir / f"{adapter}-lora/adapter_config.json", folder / "adapter_config.json")
            tensors = load_file(conv_dir / f"{adapter}-lora/adapter_model.safetensors")
            from safetensors.torch import save_file as save_torch

            save_torch({"base_model.model." + k: v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        model = Phi4MultimodalForCausalLM.from_pretrained(conv_dir, dtype=torch.float32, attn_implementation="eager").eval()
        peft_model = PeftModel.from_pretrained(model, work / "peft-vision-lora", adapter_name="vision")
        peft_model.load_adapter(work / "peft-speech-lora", adapter_name="speech")
        assert adapters_loaded(peft_model, conv_dir), "PEFT did not load the prefixed adapters either"
    peft_model.eval()
    inner = peft_model.base_model.model  # the Phi4MultimodalForCausalLM, LoRA layers inside
    extend = inner.model.embed_tokens_extend

    out = {}
    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured.setdefault(name, []).append(output.detach().clone())
        return hook

    for name, module in (("embeds", extend), ("image_tokens", extend.image_embed.img_projection_down),
                         ("audio_states", extend.audio_embed.encoder),
                         ("audio_speech", extend.audio_embed.down_proj_for_speech),
                         ("audio_vision", extend.audio_embed.down_proj_for_vision_speech)):
        module.register_forward_hook(keep(name))

    for case, spec in job["cases"].items():
        text = spec["text"]
        for k in range(1, len(spec["images"]) + 1):
            text = text.replace(f"<|image_{k}|>", tokenizer.image_token)
        for k in range(1, len(spec["audios"]) + 1):
            text = text.replace(f"<|audio_{k}|>", tokenizer.audio_token)
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        images = [Image.open(hub_dir / name) for name in spec["images"]]
        audios = [read_wav(hub_dir / name) for name in spec["audios"]]
        kwargs = {"images": images or None}
        if audios:
            kwargs["audio"] = audios
            kwargs["sampling_rate"] = 16000
        inputs = processor(text=text, return_tensors="pt", **kwargs)
        inputs.pop("attention_mask", None)
        ids_t = inputs["input_ids"]
        T = ids_t.shape[1]
        if spec["images"]:
            peft_model.set_adapter("vision")
        elif spec["audios"]:
            peft_model.set_adapter("speech")
        adapter_off = not (spec["images"] or spec["audios"])
        captured.clear()

        def forward(input_ids):
            extra = {k: v for k, v in inputs.items() if k != "input_ids"}
            if adapter_off:
                with peft_model.disable_adapter():
                    return inner(input_ids=input_ids, **extra).logits[0]
            return inner(input_ids=input_ids, **extra).logits[0]

        with torch.no_grad():
            logits = forward(ids_t).numpy()
        rows = np.unique(np.concatenate([np.arange(0, T, 29), np.arange(max(0, T - 4), T)]))
        out[f"{case}.input_ids"] = ids_t[0].numpy().astype(np.int64)
        out[f"{case}.logit_rows"] = rows.astype(np.int64)
        out[f"{case}.logits"] = logits[rows].astype(np.float32)
        embed_rows = np.unique(np.concatenate([np.arange(0, T, 7), np.arange(max(0, T - 20), T)]))
        out[f"{case}.embeds_rows"] = embed_rows.astype(np.int64)
        out[f"{case}.embeds"] = captured["embeds"][0][0].numpy()[embed_rows]

        for k, image in enumerate(images):  # one image per case here
            pixels = inputs["image_pixel_values"][k].numpy()
            mask = inputs["image_attention_mask"][k].numpy()
            views = 1 + int(inputs["image_sizes"][k][0]) // 448 * int(inputs["image_sizes"][k][1]) // 448
            tower = inner.model.embed_tokens_extend.image_embed.img_processor(
                torch.from_numpy(pixels[:views]), patch_attention_mask=torch.from_numpy(mask[:views]).bool(),
                output_hidden_states=True).hidden_states[-2]
            out[f"{case}.image{k + 1}.global_rows"] = pixels[0][:, ::32].copy()
            out[f"{case}.image{k + 1}.crops_sha256"] = np.frombuffer(
                hashlib.sha256(np.ascontiguousarray(pixels[1:views]).tobytes()).digest(), np.uint8).copy()
            out[f"{case}.image{k + 1}.mask"] = mask[:views].astype(np.uint8)
            out[f"{case}.image{k + 1}.tower"] = tower.detach().numpy()[:, job["patches"]]
            out[f"{case}.image{k + 1}.tokens"] = captured["image_tokens"][k][0].numpy()[::4]
        for k, samples in enumerate(audios):
            out[f"{case}.audio{k + 1}.features"] = inputs["audio_input_features"][k].numpy()
            out[f"{case}.audio{k + 1}.states"] = captured["audio_states"][k][0].numpy()
            head = "audio_vision" if images else "audio_speech"
            out[f"{case}.audio{k + 1}.tokens"] = captured[head][k][0].numpy()
        if case != "text":
            out[f"{case}.greedy"] = greedy(forward, ids_t, job["greedy_tokens"])
        print(f"reference: case {case}, {T} tokens", flush=True)

    # the recording tiled: past 500 encoder frames the Conformer works in chunks
    long = np.tile(read_wav(hub_dir / "speech.wav"), job["long_repeats"])
    features = processor.audio_processor(long, sampling_rate=16000, return_tensors="pt")["audio_input_features"]
    with torch.no_grad():
        states = extend.audio_embed.encoder(features, None)
    out["long.features_rows"] = features[0].numpy()[::16]
    out["long.states"] = states[0].numpy()

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    metadata = {
        "versions": json.dumps(versions), "cases": json.dumps(job["cases"]), "patches": json.dumps(job["patches"]),
        "seed": str(job["seed"]), "checkpoint_sha256": job["checkpoint_sha256"],
        "convert_script_sha256": job["convert_script_sha256"], "converted_tensors": json.dumps(converted_tensors),
        "long_repeats": str(job["long_repeats"]), "vocab_size": str(V), "notes": json.dumps(notes),
        "attention": "eager", "dtype": "float32",
    }
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(work / REFERENCE_FILE), metadata=metadata)
    print("reference:", json.dumps(versions), json.dumps(notes))


def adapters_loaded(peft_model, conv_dir: Path) -> bool:
    """Whether every lora_B of both adapters holds the file's values (PEFT leaves B at zero
    for names it does not recognise, silently)."""
    import torch
    from safetensors.torch import load_file

    state = peft_model.state_dict()
    for adapter in ("vision", "speech"):
        for name, value in load_file(conv_dir / f"{adapter}-lora/adapter_model.safetensors").items():
            key = "base_model.model." + name.replace(".weight", f".{adapter}.weight")
            if key not in state or not torch.equal(state[key].to(value.dtype), value):
                return False
    return True


def greedy(forward, ids, n: int):
    """n greedy tokens, each from a full forward over the whole sequence (no stop ids:
    the decoder is compared, not the generation policy)."""
    import numpy as np
    import torch

    sequence = ids
    new = []
    for _ in range(n):
        with torch.no_grad():
            token = int(forward(sequence)[-1].argmax())
        new.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    return np.array(new, dtype=np.int64)


if __name__ == "__main__":
    main()
