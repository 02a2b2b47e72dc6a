"""The pictures of docs/vision.md: a photo's crop grid, and its image tokens in order.

    python tools/vision_pictures.py          # writes docs/vision_crops.png, docs/vision_tokens.png

Both are drawn from minislm's own preprocessing (minislm.vision.image) of the test
image tests/fixtures/phi3_v/landscape.png, so they show what the code does.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minislm.vision.image import (  # noqa: E402
    CLIP_MEAN, CLIP_STD, hd_transform, num_image_tokens, open_image, process_image,
)

IMAGE = ROOT / "tests" / "fixtures" / "phi3_v" / "landscape.png"
COLORS = plt.get_cmap("tab10")


def as_picture(view: np.ndarray) -> np.ndarray:
    """(3, 336, 336) normalised -> (336, 336, 3) in [0, 1], for showing."""
    return np.clip(view * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None], 0, 1).transpose(1, 2, 0)


def crops_picture(path: Path, num_crops: int = 6) -> None:
    photo = open_image(IMAGE)
    padded = hd_transform(photo, num_crops)
    processed = process_image(photo, num_crops)
    rows, cols = processed.grid
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1.4, 1.4, 1]})
    axes[0].imshow(np.asarray(photo))
    axes[0].set_title(f"the photo: {photo.width} x {photo.height}")
    axes[1].imshow(padded)
    for r in range(rows):
        for c in range(cols):
            k = r * cols + c
            axes[1].add_patch(Rectangle((c * 336, r * 336), 336, 336, fill=False, lw=2.5, ec=COLORS(k % 10)))
            axes[1].text(c * 336 + 12, r * 336 + 40, f"crop {k + 1}", color=COLORS(k % 10), fontsize=11, weight="bold")
    H, W = processed.padded_size
    axes[1].set_title(f"num_crops {num_crops}: resized to {W} wide,\npadded white to {W} x {H}: {rows} x {cols} crops, row by row")
    axes[2].imshow(as_picture(processed.pixel_values[0]))
    axes[2].set_title("global view: the padded image\nshrunk to 336 x 336 (bicubic)", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"{path}: {processed.describe()}")


def tokens_picture(path: Path, rows: int = 2, cols: int = 3) -> None:
    """Every image token of a rows x cols grid as one square, in sequence order, wrapped
    the way the sequence is built: one line per row of merged cells (crops side by side,
    then sub_GN), glb_GN, then the global view's 12 lines."""
    from matplotlib.colors import to_rgb

    width = cols * 12 + 1
    lines = rows * 12 + 1 + 12
    canvas = np.ones((lines, width, 3))  # white where no token is
    n = 0
    for line in range(rows * 12):
        for c in range(cols * 12):
            canvas[line, c] = COLORS(((line // 12) * cols + c // 12) % 10)[:3]
        canvas[line, cols * 12] = 0  # sub_GN
        n += cols * 12 + 1
    canvas[rows * 12, 0] = to_rgb("red")  # glb_GN
    n += 1
    for line in range(rows * 12 + 1, lines):
        canvas[line, :12] = 0.6
        canvas[line, 12] = 0
        n += 13
    assert n == num_image_tokens(rows * 336, cols * 336)
    fig, ax = plt.subplots(figsize=(7, 7.6))
    pixels = np.kron(canvas, np.ones((8, 8, 1)))  # each token 8 x 8 pixels ...
    pixels[7::8], pixels[:, 7::8] = 1.0, 1.0  # ... with a white gap, so each token shows
    ax.imshow(pixels, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{rows} x {cols} crops -> {n} image tokens, read left to right, top to bottom", fontsize=11)
    fig.text(
        0.5, 0.04,
        "colours: the 6 crops, 12 x 12 merged cells each (a cell = 2 x 2 CLIP patches)\n"
        "black: sub_GN, after every row of cells      red: glb_GN      grey: the global view, 12 x 12\n"
        f"({rows}*{cols} + 1) * 144 + 1 + ({rows} + 1) * 12 = {n}",
        ha="center", fontsize=10,
    )
    fig.subplots_adjust(bottom=0.14, top=0.94)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"{path}: {n} tokens")


if __name__ == "__main__":
    crops_picture(ROOT / "docs" / "vision_crops.png")
    tokens_picture(ROOT / "docs" / "vision_tokens.png")
