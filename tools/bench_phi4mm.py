"""Phi-4-multimodal speed on its real shapes (random weights), against transformers.

    python tools/bench_phi4mm.py encode [--threads 2] [--repeats 2] [--vision-blocks 27] [--audio-blocks 24]
                                        [--precision float32] [--encoder speech] [--bf16-activations]
    python tools/bench_phi4mm.py decode [--threads 2] [--layers 32] [--tokens 16]

encode: the image and speech encoders as Phi-4-multimodal runs them, minislm against
transformers' own modules with the same weights and inputs, at the same precision
(float32 on both sides; bf16 weights on both sides, where minislm keeps float32
activations and torch computes in bf16; with --bf16-activations also "bf16 x bf16":
minislm's bf16 weights times activations rounded to bf16, `encoder_activations="bf16"`,
the arithmetic of torch's bf16 linear layers, timed against the same transformers run):
  image   a 500x300 picture = 3 views of 448x448 (global + 1x2 crops, the second
          padded): SigLIP-so400m (1152 wide, 4304 MLP, 16 heads) as
          Phi4MultimodalImageEmbedding.get_img_features calls it (transformers runs all
          27 blocks, post_layernorm and the pooling head, and keeps hidden_states[-2];
          minislm runs the 26 blocks that output needs), then the 2x2 pooling;
  speech  a 10 s recording (1000 mel frames, 125 tokens): the Conformer (1024 wide,
          24 blocks) from log-mel features to its states.
Runs are interleaved engine by engine within each repeat (a machine shared with other
work slows both alike); the best of the repeats is reported, all of them printed.
--vision-blocks / --audio-blocks shrink the towers (both sides alike) to save time;
--precision and --encoder time only those rows.

decode: a bf16 checkpoint with Phi-4-multimodal's decoder shapes (3072 wide, 24 heads,
8 KV heads, 8192 MLP, vocabulary 200064, the two LoRAs at ranks 256 and 320; the
encoders' real shapes; `--layers` decoder layers), random values: prefill and decode
tok/s of a text prompt, and of a prompt of the same length holding one image, with
the vision adapter unmerged (W·x + (B·(A·x))·2 per matrix) and merged.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minislm.multimodal.config import CONFORMER, TOWER, ConformerConfig, SiglipConfig  # noqa: E402


def random_picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def bf16_values(module) -> None:
    """Round a torch module's weights to bf16 values (kept float32), so both precisions
    start from the same numbers."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def randomize(module, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.05 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / int(np.prod(p.shape[1:])) ** 0.5)


def minislm_weights(module, prefix: str, renames=()) -> dict:
    weights = {}
    for name, value in module.state_dict().items():
        for new, old in renames:
            name = name.replace(new, old)
        weights[prefix + name] = value.detach().float().numpy().copy()
    return weights


def packed(weights: dict) -> dict:
    """The matrices as minislm.kernels.Bf16Weight, as load(quant="bf16") makes them."""
    from minislm.kernels import Bf16Weight
    from minislm.multimodal.config import encoder_matrix

    return {n: Bf16Weight(w) if encoder_matrix(n, w.shape) else w for n, w in weights.items()}


BF16_X_BF16 = "bf16 x bf16"   # minislm's bf16 weights times bf16 activations
TORCH_PRECISION = {BF16_X_BF16: "bf16"}   # what transformers runs for each row


AUDIO_RENAMES = (("feed_forward_in.gate_up_proj", "feed_forward_in.net.0.linear"),
                 ("feed_forward_in.down_proj", "feed_forward_in.net.2"),
                 ("feed_forward_out.gate_up_proj", "feed_forward_out.net.0.linear"),
                 ("feed_forward_out.down_proj", "feed_forward_out.net.2"),
                 ("self_attn.q_proj", "self_attn.linear_q"), ("self_attn.k_proj", "self_attn.linear_k"),
                 ("self_attn.v_proj", "self_attn.linear_v"), ("self_attn.o_proj", "self_attn.linear_out"))


def run_encode(args) -> None:
    import torch
    from transformers import (Phi4MultimodalAudioConfig, Phi4MultimodalAudioModel, Phi4MultimodalVisionConfig,
                              Phi4MultimodalVisionModel)

    from minislm.kernels import set_threads
    from minislm.multimodal.conformer import conformer_encoder
    from minislm.multimodal.features import log_mel
    from minislm.multimodal.image import process_image
    from minislm.multimodal.image_embedding import average_pool_2x2
    from minislm.multimodal.siglip import siglip_tower
    from minislm.quantize import with_encoder_activations

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    vision = SiglipConfig(num_hidden_layers=args.vision_blocks)
    tower = Phi4MultimodalVisionModel(Phi4MultimodalVisionConfig(num_hidden_layers=args.vision_blocks,
                                                                 attn_implementation="eager")).eval()
    randomize(tower, 0)
    bf16_values(tower)
    audio = ConformerConfig(num_blocks=args.audio_blocks)
    encoder = Phi4MultimodalAudioModel(Phi4MultimodalAudioConfig(num_blocks=args.audio_blocks, bias_max_distance=500,
                                                                 attn_implementation="eager")).eval()
    randomize(encoder, 1)
    bf16_values(encoder)
    ours = {"float32": {**minislm_weights(tower, TOWER), **minislm_weights(encoder, CONFORMER, AUDIO_RENAMES)}}
    ours["bf16"] = packed(ours["float32"])
    precisions = ["float32", "bf16"] if args.precision == "both" else [args.precision]
    if args.bf16_activations:  # its ratio is to transformers' bf16 row, which then runs too
        precisions += [p for p in ("bf16",) if p not in precisions]
        ours[BF16_X_BF16] = with_encoder_activations(ours["bf16"], "bf16")
        precisions.append(BF16_X_BF16)
    theirs = {"float32": (tower, encoder),
              "bf16": (Phi4MultimodalVisionModel(tower.config).eval(), Phi4MultimodalAudioModel(encoder.config).eval())}
    theirs["bf16"][0].load_state_dict(tower.state_dict())
    theirs["bf16"][1].load_state_dict(encoder.state_dict())
    theirs["bf16"] = tuple(m.to(torch.bfloat16) for m in theirs["bf16"])

    image = process_image(random_picture(500, 300))
    t = np.arange(160000) / 16000
    speech = log_mel((0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32))  # 10 s

    def minislm_image(precision):
        return average_pool_2x2(siglip_tower(vision, ours[precision], image.pixel_values, image.patch_mask))

    def transformers_image(precision):
        model = theirs[TORCH_PRECISION.get(precision, precision)][0]
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        with torch.no_grad():  # what Phi4MultimodalImageEmbedding.get_img_features runs
            out = model(torch.from_numpy(image.pixel_values).to(dtype),
                        patch_attention_mask=torch.from_numpy(image.patch_mask).contiguous(), output_hidden_states=-2)
            features = out.hidden_states[-2]
            n = features.shape[0]
            grid = features.view(n, 32, 32, -1).permute(0, 3, 1, 2)
            return torch.nn.functional.avg_pool2d(grid, 2, 2).permute(0, 2, 3, 1).float().numpy()

    def minislm_speech(precision):
        return conformer_encoder(audio, ours[precision], speech)

    def transformers_speech(precision):
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        with torch.no_grad():
            return theirs[TORCH_PRECISION.get(precision, precision)][1](torch.from_numpy(speech)[None].to(dtype), None)[0].float().numpy()

    inputs = [(what, engines) for what, engines in (
        ("image, 3 views", (("minislm", minislm_image), ("transformers", transformers_image))),
        ("speech, 10 s", (("minislm", minislm_speech), ("transformers", transformers_speech))))
        if args.encoder in ("both", what.split(",")[0])]
    for precision in precisions:  # untimed: compile, warm up, and agree
        for what, ((_, ours_run), (_, theirs_run)) in inputs:
            a, b = ours_run(precision), theirs_run(precision)
            print(f"check {precision} {what}: max |diff| {np.abs(a - b).max():.2e} (values up to {np.abs(b).max():.1f})",
                  flush=True)

    results = {}
    for _ in range(args.repeats):
        for what, engines in inputs:
            for precision in precisions:
                for engine, run in engines:
                    if precision == BF16_X_BF16 and engine == "transformers":
                        continue  # the same run as "bf16"
                    start = time.perf_counter()
                    run(precision)
                    seconds = time.perf_counter() - start
                    results.setdefault((what, precision, engine), []).append(seconds)
                    print(f"{what:15s} {precision:11s} {engine:13s} {seconds:7.2f} s", flush=True)
    print(f"\nbest of runs, seconds (threads {args.threads}; vision blocks {args.vision_blocks}, audio blocks "
          f"{args.audio_blocks}; machine shared, runs interleaved)")
    for (what, precision, engine), times in results.items():
        other = results[(what, TORCH_PRECISION.get(precision, precision), "transformers")]
        ratio = f"  {min(times) / min(other):.2f}x transformers" if engine == "minislm" else ""
        print(f"{what:15s} {precision:11s} {engine:13s} best {min(times):7.2f}  median {statistics.median(times):7.2f}"
              f"{ratio}  runs " + " ".join(f"{t:.2f}" for t in times))
    if args.json:
        Path(args.json).write_text(json.dumps({" | ".join(k): v for k, v in results.items()}, indent=1) + "\n")


def run_decode(args) -> None:
    import minislm
    from minislm.generate import GenerationStats, generate_tokens
    from minislm.kernels import set_threads
    from minislm.multimodal.image import process_image
    from minislm.multimodal.image_embedding import encode_image
    from minislm.bench.random_checkpoint import write_phi4mm_shapes
    from minislm.sampling import Sampler, SamplingSettings

    set_threads(args.threads)
    folder = Path(args.folder)
    if not (folder / "model.safetensors").is_file():
        start = time.perf_counter()
        write_phi4mm_shapes(folder, layers=args.layers)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    model = minislm.load(folder, quant=args.quant)
    image = process_image(random_picture(500, 300))
    start = time.perf_counter()
    features = encode_image(model.config.phi4mm, model.weights, image)
    encode_seconds = time.perf_counter() - start
    question = [200021, 3923, 382, 495, 30, 200020, 200019]  # <|user|> ... <|end|><|assistant|> (ids only: no tokenizer)
    image_ids = np.array(question[:1] + [-1] * image.num_tokens + question[1:])
    text_ids = np.random.default_rng(0).integers(1000, 100000, len(image_ids))
    print(f"Phi-4-multimodal shapes, {args.layers} decoder layers, weights {model.weights_format.describe()}, threads "
          f"{args.threads}: image {image.describe()}, encoded in {encode_seconds:.1f} s", flush=True)
    runs = [("text, no adapter", model, text_ids, None), ("image, vision adapter", model.with_adapter("vision"), image_ids, features)]
    if args.quant != "int4":
        runs.append(("image, vision adapter merged", model.with_adapter("vision", merge=True), image_ids, features))
    for label, runner, ids, feats in runs:  # untimed: the weights' pages come in from the file
        list(generate_tokens(runner, text_ids[:8], 2, Sampler(SamplingSettings(temperature=0.0)), ()))
    results = {}
    for _ in range(args.repeats):  # interleaved: a busy machine slows every run alike
        for label, runner, ids, feats in runs:
            stats = GenerationStats()
            list(generate_tokens(runner, ids, args.tokens, Sampler(SamplingSettings(temperature=0.0)), (), stats=stats,
                                 image_features=feats))
            results.setdefault(label, []).append((stats.prefill_tokens_per_second, stats.decode_tokens_per_second))
            print(f"{label:30s} prompt {len(ids)} tokens: prefill {stats.prefill_tokens_per_second:7.1f} tok/s, "
                  f"decode {stats.decode_tokens_per_second:6.2f} tok/s over {stats.generated_tokens} tokens", flush=True)
    print("\nbest of runs (tok/s)")
    for label, runs_ in results.items():
        print(f"{label:30s} prefill {max(r[0] for r in runs_):7.1f}   decode {max(r[1] for r in runs_):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--repeats", type=int, default=2)
    enc.add_argument("--threads", type=int, default=2)
    enc.add_argument("--vision-blocks", type=int, default=27)
    enc.add_argument("--audio-blocks", type=int, default=24)
    enc.add_argument("--precision", choices=["both", "float32", "bf16"], default="both", help="which rows to time")
    enc.add_argument("--encoder", choices=["both", "image", "speech"], default="both", help="which encoder to time")
    enc.add_argument("--bf16-activations", action="store_true",
                     help="also time minislm's bf16 encoders with activations rounded to bf16 (row 'bf16 x bf16')")
    enc.add_argument("--json", help="write every timing here")
    dec = sub.add_parser("decode")
    dec.add_argument("--folder", default="/tmp/phi4mm-random")
    dec.add_argument("--layers", type=int, default=32)
    dec.add_argument("--tokens", type=int, default=16)
    dec.add_argument("--threads", type=int, default=2)
    dec.add_argument("--quant", choices=["bf16", "int4"], default="bf16")
    dec.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run_encode(args) if args.what == "encode" else run_decode(args)


if __name__ == "__main__":
    main()
