"""Where a speech encode spends its time: cProfile of minislm's Conformer on
tools/bench_phi4mm.py's random weights (the real widths, --blocks of its 24), float32,
bf16 and bf16 x bf16 (bf16 weights times activations rounded to bf16,
`encoder_activations="bf16"`), on a 10 s recording.

    python tools/profile_speech_encoder.py --threads 2 --blocks 6

Needs torch and transformers (the bench builds its weights from transformers'
Phi4MultimodalAudioModel, so both engines start from the same numbers).
"""

import argparse
import cProfile
import pstats
import time

import numpy as np

import bench_phi4mm as bench  # tools/bench_phi4mm.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rows", type=int, default=10, help="functions listed per profile")
    args = parser.parse_args()

    import torch
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalAudioModel

    from minislm.kernels import set_threads
    from minislm.multimodal.conformer import conformer_encoder
    from minislm.multimodal.features import log_mel
    from minislm.quantize import with_encoder_activations

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    config = bench.ConformerConfig(num_blocks=args.blocks)
    reference = Phi4MultimodalAudioModel(Phi4MultimodalAudioConfig(num_blocks=args.blocks, bias_max_distance=500,
                                                                   attn_implementation="eager")).eval()
    bench.randomize(reference, 1)
    bench.bf16_values(reference)
    weights = {"float32": bench.minislm_weights(reference, bench.CONFORMER, bench.AUDIO_RENAMES)}
    weights["bf16"] = bench.packed(weights["float32"])
    weights["bf16 x bf16"] = with_encoder_activations(weights["bf16"], "bf16")
    t = np.arange(160000) / 16000
    speech = log_mel((0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32))  # 10 s

    for precision, w in weights.items():
        conformer_encoder(config, w, speech)  # compile and warm up
        start = time.perf_counter()
        conformer_encoder(config, w, speech)
        print(f"{precision}: {time.perf_counter() - start:.3f} s unprofiled")
        profile = cProfile.Profile()
        profile.enable()
        conformer_encoder(config, w, speech)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
