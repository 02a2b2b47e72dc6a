"""Phi-4-multimodal in the watch commands: `--image` and `--audio` with `trace` and
`explain`, and the spectrogram a recording becomes (`trace --spectrogram FILE`).

A recording is shown as its log-mel spectrogram: one column per 10 ms frame, one row
per mel band, low frequencies at the bottom. Every 8 columns become one audio token
(the encoder's subsampling), so the picture marks those boundaries, and the trace
says which prompt positions the tokens fill.
"""

import base64

import numpy as np

from ..errors import MinislmError

FRAMES_PER_TOKEN = 8


def prompt_audios(args) -> list:
    """--audio files as processed recordings, before the model loads (a bad file fails
    at once), and the flags that only make sense with them."""
    from ..media_commands import process_audios

    audios = process_audios(getattr(args, "audio", []))
    if getattr(args, "spectrogram", None) and not audios:
        raise MinislmError("--spectrogram: applies to --audio only")
    if audios and args.no_bos:
        raise MinislmError("--no-bos: with --audio the processor's tokenization decides")
    return audios


def multimodal_prompt(model, args, pictures, audios, trace):
    """Phi-4-multimodal's prompt (its encoders recorded into `trace`) and the model with
    the adapter it asks for."""
    prompt = model.multimodal_prompt(args.prompt, pictures, audios, args.system, chat=args.chat, trace=trace,
                                     max_crops=args.num_crops)
    return prompt, model.with_adapter(prompt.adapter)


def media_lines(prompt, model) -> list[str]:
    """Where each picture and recording went, and the adapter the decoder runs with."""
    lines = []
    spans = {name: (a, b) for name, a, b in prompt.spans()}
    for k, image in enumerate(prompt.images, 1):
        a, b = spans[f"image {k}"]
        lines.append(f"image {k}: {image.describe()}, positions {a}..{b - 1} of {len(prompt.ids)}")
    for k, audio in enumerate(prompt.audios, 1):
        a, b = spans[f"audio {k}"]
        lines.append(f"audio {k}: {audio.describe()}, positions {a}..{b - 1} of {len(prompt.ids)}")
    adapter = model.adapter
    lines.append(f"adapter {adapter.describe()}" if adapter is not None else "adapter: none (text only)")
    return lines


def spectrogram_bytes(features: np.ndarray) -> tuple[str, float, float]:
    """(T, 80) log-mel -> base64 of (80, T) uint8, low bands last (the bottom row of a
    picture), scaled from the recording's own min..max; and that min and max."""
    low, high = float(features.min()), float(features.max())
    scaled = (features - low) / (high - low if high > low else 1.0)
    image = np.round(scaled.T[::-1] * 255).astype(np.uint8)  # (80, T)
    return base64.b64encode(np.ascontiguousarray(image).tobytes()).decode("ascii"), low, high


def audio_data(ids: np.ndarray, audios) -> list[dict]:
    """Each recording of the shown prompt, for the explorer page."""
    from ..multimodal.prompt import AUDIO_MARK

    out = []
    for k, audio in enumerate(audios, 1):
        positions = np.flatnonzero(ids == -(AUDIO_MARK + k))
        if not len(positions):
            continue  # after the page's cut
        data, low, high = spectrogram_bytes(audio.features)
        out.append({
            "index": k, "describe": audio.describe(), "frames": int(len(audio.features)), "bins": 80,
            "tokens": int(len(positions)), "first": int(positions[0]), "last": int(positions[-1]),
            "spectrogram": data, "low": round(low, 3), "high": round(high, 3), "frames_per_token": FRAMES_PER_TOKEN,
        })
    return out


def spectrogram_figure(audios, prompt, path_label: str = ""):
    """One panel per recording: its log-mel spectrogram (frames across, mel bands up),
    a line every 8 frames where one audio token ends, and the positions they fill."""
    from .plots import new_figure

    spans = {name: (a, b) for name, a, b in prompt.spans()} if prompt is not None else {}
    fig = new_figure(min(4 + max(len(a.features) for a in audios) / 40, 60), 2.6 * len(audios))
    for k, audio in enumerate(audios, 1):
        ax = fig.add_subplot(len(audios), 1, k)
        frames = len(audio.features)
        image = ax.imshow(audio.features.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                          extent=(0, frames, 0, audio.features.shape[1]))
        for boundary in range(FRAMES_PER_TOKEN, frames, FRAMES_PER_TOKEN):
            ax.axvline(boundary, color="white", linewidth=0.3, alpha=0.5)
        where = ""
        if f"audio {k}" in spans:
            a, b = spans[f"audio {k}"]
            where = f"; its {b - a} tokens fill positions {a}..{b - 1}"
        ax.set_title(f"audio {k}{path_label}: {audio.describe()}{where}", fontsize=9)
        ax.set_xlabel(f"frame (10 ms); a line every {FRAMES_PER_TOKEN} frames = one audio token")
        ax.set_ylabel("mel band (low -> high)")
        fig.colorbar(image, ax=ax, label="ln(energy)")
    return fig
