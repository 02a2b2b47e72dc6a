"""Image encoding and decode speed on Phi-3-vision's shapes (random weights).

    python tools/bench_vision.py encode [--repeats 3] [--threads 2] [--precision float32] [--bf16-activations]
    python tools/bench_vision.py decode [--folder /tmp/phi3v-random] [--tokens 16]

encode: CLIP ViT-L/14-336 on the views of one image (num_crops 1: global + 1 crop;
num_crops 16: global + 16 crops), minislm's tower (`minislm.vision.tower`) against
transformers' native `CLIPVisionModel` on the same pixels, at the same precision
(float32 weights and activations on both sides; bf16 weights on both sides, where
minislm keeps float32 activations and torch computes in bf16; with --bf16-activations
also "bf16 x bf16": minislm's bf16 weights times activations rounded to bf16,
`encoder_activations="bf16"`, timed against the same transformers bf16 runs). Both run the same
work: the patch embedding and 23 blocks (Phi-3-vision reads the penultimate block's
output; transformers is given 23 layers, whose last hidden state is that output).
A third column times what Phi-3-vision's own remote code runs: all 24 blocks with
output_hidden_states. Runs are interleaved, engine by engine within each repeat, so
a machine shared with other work slows all of them alike; the best of the repeats
is reported (and all of them are printed).

decode: a bf16 checkpoint with Phi-3-vision-128k's real shapes (4.2B parameters,
~8.5 GB, written once to --folder), one image (num_crops 1, 313 tokens) and a short
question, then `--tokens` greedy tokens: image encoding, prefill and decode tok/s.
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

from minislm.vision.config import VISION_MODEL, VisionConfig, vision_shapes  # noqa: E402
from minislm.vision.image import process_image  # noqa: E402
from minislm.vision.tower import vision_tower  # noqa: E402

TEXT_HIDDEN = 3072
BF16_X_BF16 = "bf16 x bf16"   # minislm's bf16 weights times bf16 activations
TORCH_PRECISION = {BF16_X_BF16: "bf16"}   # what transformers runs for each row


def random_picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tower_weights(config: VisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 CLIP ViT-L/14-336 weights under the checkpoint's names, scaled as
    the random checkpoints are (`initial_value`)."""
    from minislm.bench.random_checkpoint import initial_value

    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in vision_shapes(config, TEXT_HIDDEN).items():
        if name.startswith(VISION_MODEL):
            uniform = rng.random(int(np.prod(shape)), dtype=np.float32) * np.float32(2) - np.float32(1)
            weights[name] = initial_value(name, shape, uniform)
    return weights


def bf16_round(weights: dict) -> dict:
    from minislm.weights import bf16_to_float32, float32_to_bf16

    return {n: bf16_to_float32(float32_to_bf16(w)).reshape(w.shape) for n, w in weights.items()}


def packed(weights: dict) -> dict:
    """The tower's matrices as minislm.kernels.Bf16Weight, as load(quant="bf16") makes them."""
    from minislm.kernels import Bf16Weight
    from minislm.quantize import IMAGE_MATRICES

    return {n: Bf16Weight(w) if n.endswith(IMAGE_MATRICES) else w for n, w in weights.items()}


def transformers_clip(weights: dict, layers: int, dtype):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    # transformers' default attention for CLIP (sdpa)
    model = CLIPVisionModel(config).eval()
    state = model.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    own = {prefix + n.removeprefix(VISION_MODEL): torch.from_numpy(np.ascontiguousarray(w)) for n, w in weights.items()}
    own = {k: v for k, v in own.items() if k in state}
    missing, _ = model.load_state_dict(own, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    return model.to(dtype)


def run_encode(args) -> None:
    import torch

    from minislm.kernels import set_threads
    from minislm.quantize import with_encoder_activations

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = VisionConfig()
    weights = bf16_round(tower_weights(config))  # bf16 values, so both precisions start from the same numbers
    ours = {"float32": weights, "bf16": packed(weights)}
    precisions = ["float32", "bf16"] if args.precision == "both" else [args.precision]
    if args.bf16_activations:  # its ratio is to transformers' bf16 row, which then runs too
        precisions += [p for p in ("bf16",) if p not in precisions]
        ours[BF16_X_BF16] = with_encoder_activations(ours["bf16"], "bf16")
        precisions.append(BF16_X_BF16)
    reference = {
        ("float32", 23): transformers_clip(weights, 23, torch.float32),
        ("bf16", 23): transformers_clip(weights, 23, torch.bfloat16),
        ("float32", 24): transformers_clip(weights, 24, torch.float32),
        ("bf16", 24): transformers_clip(weights, 24, torch.bfloat16),
    }
    images = {
        "1+1": process_image(random_picture(640, 480), 1).pixel_values,  # global view + 1 crop
        "16+1": process_image(random_picture(1344, 1344), 16).pixel_values,  # global view + 4x4 crops
    }

    def minislm_run(precision, pixels):
        return vision_tower(config, ours[precision], pixels)

    def transformers_run(precision, layers, pixels):
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        with torch.no_grad():
            out = reference[(TORCH_PRECISION.get(precision, precision), layers)](torch.from_numpy(pixels).to(dtype), output_hidden_states=layers == 24)
        return (out.hidden_states[-2] if layers == 24 else out.last_hidden_state)[:, 1:].float().numpy()

    # one untimed run each: Numba compiles, torch warms up; and the outputs agree
    small = images["1+1"]
    for precision in precisions:
        a, b = minislm_run(precision, small), transformers_run(precision, 23, small)
        print(f"check {precision}: max |minislm - transformers| = {np.abs(a - b).max():.2e} (values up to {np.abs(b).max():.1f})")
        transformers_run(precision, 24, small)

    results = {}
    for views, pixels in images.items():
        repeats = args.repeats if views == "1+1" else args.repeats_16
        for _ in range(repeats):
            for precision in precisions:
                engines = [("minislm", lambda: minislm_run(precision, pixels))]
                if precision != BF16_X_BF16:   # transformers: the same runs as "bf16"
                    engines.append(("transformers CLIPVisionModel (23 blocks)", lambda: transformers_run(precision, 23, pixels)))
                if views == "1+1" and precision != BF16_X_BF16:  # 24 blocks cost 24/23 of 23: timed once, on the small image
                    engines.append(("transformers, 24 blocks + hidden_states (the remote code's way)",
                                    lambda: transformers_run(precision, 24, pixels)))
                for engine, run in engines:
                    start = time.perf_counter()
                    run()
                    seconds = time.perf_counter() - start
                    results.setdefault((views, precision, engine), []).append(seconds)
                    print(f"{views:5s} {precision:11s} {engine:66s} {seconds:7.2f} s", flush=True)

    print(f"\nbest of runs, seconds (threads {args.threads}; machine shared, runs interleaved)")
    print(f"{'views':6s} {'precision':11s} {'engine':66s} {'best':>7s} {'median':>7s}  runs")
    for (views, precision, engine), times in results.items():
        print(f"{views:6s} {precision:11s} {engine:66s} {min(times):7.2f} {statistics.median(times):7.2f}  "
              + " ".join(f"{t:.2f}" for t in times))
    if args.json:
        Path(args.json).write_text(json.dumps({" | ".join(k): v for k, v in results.items()}, indent=1) + "\n")


def run_decode(args) -> None:
    import minislm
    from minislm.generate import GenerationStats, generate_tokens
    from minislm.kernels import set_threads
    from minislm.sampling import Sampler, SamplingSettings
    from minislm.vision.embedding import encode_image
    from minislm.bench.random_checkpoint import PHI3_VISION_128K, write_random_checkpoint

    set_threads(args.threads)
    folder = Path(args.folder)
    if not (folder / "model.safetensors").is_file():
        start = time.perf_counter()
        write_random_checkpoint(folder, PHI3_VISION_128K, "BF16")
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    model = minislm.load(folder, quant="bf16")
    # no tokenizer in a random checkpoint: Phi-3-vision's real ids around the image
    image = process_image(random_picture(640, 480), 1)
    start = time.perf_counter()
    features = encode_image(model.config.vision, model.weights, image)
    encode_seconds = time.perf_counter() - start
    ids = np.array([1, 32010, 29871, 13] + [-1] * image.num_tokens + [1, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001])
    stats = GenerationStats()
    sampler = Sampler(SamplingSettings(temperature=0.0), seed=0)
    tokens = list(generate_tokens(model, ids, args.tokens, sampler, (), stats=stats, image_features=features))
    print(f"Phi-3-vision shapes, bf16, threads {args.threads}: image {image.describe()}, encoded in {encode_seconds:.1f} s; "
          f"prompt {len(ids)} tokens, prefill {stats.prefill_tokens_per_second:.1f} tok/s; "
          f"decode {stats.decode_tokens_per_second:.2f} tok/s over {len(tokens)} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--repeats", type=int, default=3, help="runs of each engine on the 1+1 view image")
    enc.add_argument("--repeats-16", type=int, default=1, help="runs of each engine on the 16+1 view image")
    enc.add_argument("--threads", type=int, default=2)
    enc.add_argument("--precision", choices=["both", "float32", "bf16"], default="both", help="which rows to time")
    enc.add_argument("--bf16-activations", action="store_true",
                     help="also time minislm's bf16 tower with activations rounded to bf16 (row 'bf16 x bf16')")
    enc.add_argument("--json", help="write every timing here")
    dec = sub.add_parser("decode")
    dec.add_argument("--folder", default="/tmp/phi3v-random")
    dec.add_argument("--tokens", type=int, default=16)
    dec.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run_encode(args) if args.what == "encode" else run_decode(args)


if __name__ == "__main__":
    main()
