"""From the Conformer's states to the audio tokens the decoder reads.

    encoder states (T', D_audio), one per 80 ms
      -> projector: Linear(D_audio, D), GELU, Linear(D, D)      (T', D)

The model has two projectors of the same shape (`audio_projection.speech` and
`audio_projection.vision`): the first for prompts with sound only, the second for
prompts that also hold a picture, since the vision LoRA then runs the decoder
(transformers picks the second whenever `image_pixel_values` is given; the hub's
remote code by its input mode, VISION_SPEECH: the same rule).
"""

import numpy as np

from ..model import NO_TRACE, linear
from ..vision.embedding import gelu
from .audio import ProcessedAudio
from .config import AUDIO_EMBED, Phi4MMConfig
from .conformer import conformer_encoder


def project_audio(states: np.ndarray, weights: dict, with_image: bool) -> np.ndarray:
    """(T', D_audio) -> (T', D) with the speech head, or the vision-speech head."""
    p = f"{AUDIO_EMBED}audio_projection.{'vision' if with_image else 'speech'}."
    h = gelu(linear(states, weights[p + "0.weight"], weights[p + "0.bias"]))
    return linear(h, weights[p + "2.weight"], weights[p + "2.bias"])


def encode_audio(mm: Phi4MMConfig, weights: dict, audio: ProcessedAudio, with_image: bool,
                 trace=NO_TRACE) -> np.ndarray:
    """A processed recording -> its (num_tokens, D) embeddings, in placeholder order."""
    trace.record("audio_features", audio.features)  # (T, 80)
    states = conformer_encoder(mm.audio, weights, audio.features, trace)  # (T', D_audio)
    trace.record("audio_states", states)
    tokens = project_audio(states, weights, with_image)
    trace.record("audio_tokens", tokens)
    assert len(tokens) == audio.num_tokens, (len(tokens), audio.num_tokens)
    return np.ascontiguousarray(tokens, dtype=np.float32)
