"""Where an image encode spends its time: cProfile of minislm's CLIP tower (Phi-3-vision)
on tools/bench_vision.py's random weights, in float32 and bf16.

    python tools/profile_vision_tower.py --threads 2 --views 2 --blocks 4

--views 2 is a num_crops 1 image (global view + 1 crop), --views 17 a num_crops 16 one;
--blocks runs that many of the 23 blocks (each block costs the same, so a few show
the split of the whole tower). Needs no torch: only minislm and Pillow.
"""

import argparse
import cProfile
import dataclasses
import pstats
import time

import numpy as np

import bench_vision as bench  # tools/bench_vision.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, default=2, help="crops encoded together (2: num_crops 1, 17: num_crops 16)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks run, of the 23 Phi-3-vision reads")
    parser.add_argument("--precision", choices=["float32", "bf16", "both"], default="float32")
    parser.add_argument("--rows", type=int, default=15, help="functions listed per profile")
    args = parser.parse_args()

    from minislm.kernels import set_threads
    from minislm.vision.config import VisionConfig
    from minislm.vision.tower import vision_tower

    set_threads(args.threads)
    config = VisionConfig()
    weights = bench.bf16_round(bench.tower_weights(config))
    config = dataclasses.replace(config, layer_idx=args.blocks)  # hidden_states[blocks]: that many blocks run
    pixels = np.random.default_rng(0).standard_normal((args.views, 3, 336, 336)).astype(np.float32)
    precisions = ["float32", "bf16"] if args.precision == "both" else [args.precision]
    for precision in precisions:
        w = weights if precision == "float32" else bench.packed(weights)
        vision_tower(config, w, pixels)  # compile and warm up
        start = time.perf_counter()
        vision_tower(config, w, pixels)
        print(f"{precision}, {args.views} views, {args.blocks} blocks: {time.perf_counter() - start:.3f} s unprofiled")
        profile = cProfile.Profile()
        profile.enable()
        vision_tower(config, w, pixels)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
