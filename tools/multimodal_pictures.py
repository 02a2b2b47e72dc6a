"""The pictures of docs/multimodal.md: one picture and one spoken sentence on their way
to the tokens Phi-4-multimodal's decoder reads.

    python tools/multimodal_pictures.py      # writes docs/multimodal_crops.png, docs/multimodal_tokens.png,
                                             # docs/multimodal_spectrogram.png (and the two inputs, once)

The inputs are committed beside them: docs/multimodal_picture.png, a synthetic
640x360 scene (drawn here), and docs/multimodal_question.wav, the sentence "What is
shown in this picture?" spoken by espeak-ng (Debian's package; 22,050 Hz, so the
spoken question also goes through the resampler). Everything drawn comes from
minislm's own processing of them (minislm.multimodal.image, .features).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minislm.multimodal.audio import process_audio  # noqa: E402
from minislm.multimodal.image import POOLED_SIDE, crop_layout, process_image  # noqa: E402
from minislm.vision.image import open_image  # noqa: E402

DOCS = ROOT / "docs"
PICTURE = DOCS / "multimodal_picture.png"
QUESTION = DOCS / "multimodal_question.wav"
SENTENCE = "What is shown in this picture?"


def make_inputs() -> None:
    """The scene and the spoken question, if they are not there yet."""
    from PIL import Image

    if not PICTURE.is_file():
        h, w = 360, 640
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        sky = np.stack([120 + 0.2 * y, 170 + 0.15 * y, 255 - 0.1 * y], -1)
        hills = (y > 230 + 40 * np.sin(x / 90) + 20 * np.sin(x / 23))
        ground = np.stack([70 + 0 * x, 140 - 0.1 * (y - 230), 60 + 0 * x], -1)
        sun = (x - 480) ** 2 + (y - 90) ** 2 < 45**2
        house = (x > 150) & (x < 260) & (y > 200) & (y < 290)
        roof = (y > 150) & (y <= 200) & (np.abs(x - 205) < (y - 150) * 1.1)
        scene = np.where(hills[..., None], ground, sky)
        scene[sun] = [255, 220, 60]
        scene[house] = [200, 80, 60]
        scene[roof] = [110, 40, 30]
        Image.fromarray(scene.clip(0, 255).astype(np.uint8)).save(PICTURE, optimize=True)
    if not QUESTION.is_file():
        if shutil.which("espeak-ng") is None:
            sys.exit(f"{QUESTION} is missing and espeak-ng is not installed (apt-get install espeak-ng)")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(QUESTION), SENTENCE], check=True)


def as_rgb(view: np.ndarray) -> np.ndarray:
    """(3, 448, 448) in [-1, 1] -> (448, 448, 3) in [0, 1]."""
    return np.clip(view * 0.5 + 0.5, 0, 1).transpose(1, 2, 0)


def crops_picture(path: Path) -> None:
    photo = open_image(PICTURE, mode=None)
    image = process_image(photo)
    (cols, rows), (new_w, new_h), (pad_w, pad_h) = crop_layout(*photo.size)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0), gridspec_kw={"width_ratios": [1.2, 2.2, 1]})
    axes[0].imshow(np.asarray(photo))
    axes[0].set_title(f"the picture, {photo.size[0]}x{photo.size[1]}")
    canvas = np.ones((rows * 448, cols * 448, 3))
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        canvas[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448] = as_rgb(image.pixel_values[1 + k])
    axes[1].imshow(canvas)
    mask = image.patch_mask[1:].reshape(rows, cols, 32, 32).transpose(0, 2, 1, 3).reshape(rows * 32, cols * 32)
    for (pr, pc) in zip(*np.nonzero(~mask)):
        axes[1].add_patch(Rectangle((pc * 14, pr * 14), 14, 14, facecolor="black", alpha=0.25, linewidth=0))
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        axes[1].add_patch(Rectangle((c * 448, r * 448), 448, 448, fill=False, edgecolor="red", linewidth=2))
        axes[1].text(c * 448 + 10, r * 448 + 40, f"crop {k + 1}", color="red", fontsize=11)
    masked = int((~mask).sum())
    axes[1].set_title(f"resized to {new_w}x{new_h}, padded white to {cols * 448}x{rows * 448}: {rows}x{cols} crops;\n"
                      f"{masked} padding patches of 14x14 (shaded) are masked")
    axes[2].imshow(as_rgb(image.pixel_values[0]))
    axes[2].set_title("global view, 448x448 (bicubic)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}: {image.describe()}")


def tokens_picture(path: Path) -> None:
    """The image tokens in sequence order: the crops' picture cells row by row, each row
    ended by sub_GN; glb_GN; the global view's 16 rows of 16 + sub_GN."""
    image = process_image(open_image(PICTURE, mode=None))
    rows, cols = image.useful_cells
    width = max(cols + 1, POOLED_SIDE + 1)
    fig, ax = plt.subplots(figsize=(12, 7))
    y = 0
    n = 0
    for r in range(rows):
        for c in range(cols + 1):
            ax.add_patch(Rectangle((c, -y), 1, -1, facecolor="tab:blue" if c < cols else "tab:orange",
                                   edgecolor="white", linewidth=0.3))
            n += 1
        y += 1
    ax.add_patch(Rectangle((0, -y), 1, -1, facecolor="tab:red", edgecolor="white"))
    ax.text(1.3, -y - 0.8, f"glb_GN (token {n + 1})", fontsize=10)
    n += 1
    y += 1.5
    for r in range(POOLED_SIDE):
        for c in range(POOLED_SIDE + 1):
            ax.add_patch(Rectangle((c, -y), 1, -1, facecolor="tab:green" if c < POOLED_SIDE else "tab:orange",
                                   edgecolor="white", linewidth=0.3))
            n += 1
        y += 1
    assert n == image.num_tokens, (n, image.num_tokens)
    ax.set_xlim(-0.5, width + 12)
    ax.set_ylim(-y - 0.5, 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text(width + 0.8, -rows / 2, f"crops: {rows} rows of {cols} pooled cells\n(only cells holding picture)\n"
            f"+ sub_GN after each row\n= {rows * (cols + 1)} tokens", fontsize=10, va="center")
    ax.text(width + 0.8, -(rows + 1.5 + POOLED_SIDE / 2), f"global view: {POOLED_SIDE} rows of {POOLED_SIDE}\n"
            f"+ sub_GN after each row\n= {POOLED_SIDE * (POOLED_SIDE + 1)} tokens", fontsize=10, va="center")
    ax.set_title(f"the {image.num_tokens} image tokens in the order the decoder reads them "
                 "(blue: crop cells, orange: sub_GN, red: glb_GN, green: global view)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}: {image.num_tokens} tokens")


def spectrogram_picture(path: Path) -> None:
    from minislm.watch.media import spectrogram_figure

    audio = process_audio(QUESTION)
    fig = spectrogram_figure([audio], None, f' ("{SENTENCE}", espeak-ng)')
    fig.savefig(path, dpi=80)
    print(f"wrote {path}: {audio.describe()}")


def main() -> None:
    make_inputs()
    crops_picture(DOCS / "multimodal_crops.png")
    tokens_picture(DOCS / "multimodal_tokens.png")
    spectrogram_picture(DOCS / "multimodal_spectrogram.png")


if __name__ == "__main__":
    main()
