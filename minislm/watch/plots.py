"""The pictures: matplotlib figures of what the watch commands print as text.

matplotlib is an optional extra (`pip install 'minislm[plot]'`); every --png flag
checks for it before any work and says how to install it. Figures are made with
`matplotlib.figure.Figure`, not pyplot, so nothing global is created or kept.
Each function returns the Figure, whose image arrays are the numbers shown
(tests read them back).
"""

import math

import numpy as np

from ..errors import MinislmError

# Token labels and numbers inside cells stop being readable past these sizes.
MAX_LABELLED_TOKENS = 64
MAX_ANNOTATED_CELLS = 48


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MinislmError(
            "--png needs matplotlib, which is not installed: pip install 'minislm[plot]' (or pip install matplotlib); "
            "without --png the text output works as it is"
        ) from None


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, 60), min(height, 60)), layout="constrained")


def save(fig, path: str, flag: str) -> None:
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise MinislmError(f"{flag}: cannot write {path} ({e.strerror})") from None


def label_tokens(ax, labels: list[str], axis: str) -> None:
    """Token pieces along an axis (▁ word starts and <0xNN> bytes as they are, never cut
    short); past MAX_LABELLED_TOKENS, position numbers every few tokens instead."""
    if len(labels) > MAX_LABELLED_TOKENS:
        step = label_step(len(labels))
        ticks = np.arange(0, len(labels), step)
        labels = [str(t) for t in ticks]
    else:
        ticks = np.arange(len(labels))
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    else:
        ax.set_yticks(ticks, labels, fontsize=8)


def label_step(n: int) -> int:
    """Label every k-th of n positions so that about 32 labels remain."""
    return next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if n / k <= 32)


def lens_figure(lens, labels: list[str]):
    """Rows: the streams (embed, layer 0..); columns: positions. Colour: the probability of
    the stream's top token; text: that token, in bold where it is the actual next token."""
    R, T = lens.top_probs.shape
    widest = max(len(piece) for row in lens.top_pieces for piece in row)  # cells grow to fit whole pieces
    fig = new_figure(max(8.5, 2.5 + max(0.45, 0.07 * widest) * T), 1.5 + 0.35 * R)
    ax = fig.subplots()
    image = ax.imshow(lens.top_probs, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="probability of the top token", shrink=0.8)
    ax.set_yticks(np.arange(R), lens.rows, fontsize=8)
    label_tokens(ax, [f"{t} {p}" for t, p in enumerate(labels)], "x")
    ax.set_xlabel("input token at each position (the prediction is for the token after it)")
    ax.set_title("logit lens: each layer's top next-token prediction (bold = the actual next token)", fontsize=10)
    if T <= MAX_ANNOTATED_CELLS:
        for r in range(R):
            for t in range(T):
                correct = t + 1 < T and lens.next_ranks[r, t] == 1
                ax.text(t, r, lens.top_pieces[r][t], ha="center", va="center", fontsize=6,
                        color="black" if lens.top_probs[r, t] > 0.6 else "white",
                        fontweight="bold" if correct else "normal")
    return fig


def attention_figure(probs: np.ndarray, heads: list[int], labels: list[str], layer: int, skipped=None):
    """One heatmap per head: row = query position, column = key position; the future
    (right of the diagonal), which the causal mask hides, in grey. `skipped` (h, T, T):
    keys a block-sparse layer (Phi-3-small) leaves out although they are in the past,
    in orange; the title says how many there are."""
    n = len(heads)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    T = len(labels)
    side = 2.0 + (0.18 * T if n == 1 else min(0.18 * T, 4))
    fig = new_figure(cols * side + 1, rows * side)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    from matplotlib import colormaps

    cmap = colormaps["Blues"].with_extremes(bad="#e6e6e6")  # grey: keys after the query, masked
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # masked: after the query and exactly 0
    for n_head, (ax, head, p) in enumerate(zip(axes, heads, probs)):
        image = ax.imshow(np.ma.masked_array(p, future & (p == 0)), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        title = f"head {head}"
        if skipped is not None:
            cells = skipped[n_head] & (p == 0)  # skipped, and so exactly 0
            overlay = np.zeros((T, T, 4))
            overlay[cells] = (1.0, 0.55, 0.1, 0.85)  # orange: left out by the block pattern
            ax.imshow(overlay, interpolation="nearest")
            title += f" ({int(cells.sum())} keys skipped)"
        ax.set_title(title, fontsize=9)
        if n == 1 or T <= 24:
            label_tokens(ax, labels, "x")
            label_tokens(ax, labels, "y")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:n]), label="attention probability", shrink=0.8)
    fig.suptitle(f"layer {layer}: attention of each query (row) over the keys (columns)"
                 + ("; orange: keys the block-sparse pattern skips" if skipped is not None else ""))
    return fig


def rope_figure(table, config):
    """Wavelength per dimension pair (log scale) against the context lengths; with
    LongRoPE, the two factor sets side by side."""
    rope = config.rope
    pairs = np.arange(table.rotary_dim // 2)
    long = table.inv_freq_long is not None
    fig = new_figure(12 if long else 7, 4.5)
    axes = np.atleast_1d(fig.subplots(1, 2 if long else 1))
    ax = axes[0]
    ax.semilogy(pairs, table.wavelength_short, "o-", label="short factors" if long else "wavelength")
    if long:
        ax.semilogy(pairs, table.wavelength_long, "s-", label="long factors")
        ax.axhline(rope.original_max_position_embeddings, color="gray", ls=":",
                   label=f"switch: {rope.original_max_position_embeddings} tokens")
    ax.axhline(config.max_position_embeddings, color="black", ls="--", label=f"context: {config.max_position_embeddings}")
    ax.set_xlabel(f"dimension pair i (dims i and i + {table.rotary_dim // 2})")
    ax.set_ylabel("wavelength, tokens per full turn")
    ax.set_title(f"RoPE theta {rope.theta:g}: wavelength = 2 pi / inv_freq")
    ax.legend(fontsize=8)
    if long:
        ax = axes[1]
        ax.plot(pairs, table.short_factor, "o-", label=f"short (scale {rope.short_scale:.4g})")
        ax.plot(pairs, table.long_factor, "s-", label=f"long (scale {rope.long_scale:.4g})")
        ax.set_xlabel("dimension pair i")
        ax.set_ylabel("factor: inv_freq is divided by it")
        ax.set_title("LongRoPE factors and attention scales")
        ax.legend(fontsize=8)
    return fig


def routing_figure(routing):
    """Two panels, first and second choice: rows = layers, columns = tokens, colour = expert."""
    from matplotlib.colors import ListedColormap

    L, T, _ = routing.experts.shape
    E = routing.num_experts
    import matplotlib

    palette = matplotlib.colormaps["tab20" if E > 10 else "tab10"]
    cmap = ListedColormap([palette(e % palette.N) for e in range(E)])
    fig = new_figure(max(8, 2.5 + 0.4 * T), 2.5 + 0.6 * L * 2)
    axes = fig.subplots(2, 1, sharex=True)
    for choice, ax in enumerate(axes):
        image = ax.imshow(routing.experts[:, :, choice], cmap=cmap, vmin=-0.5, vmax=E - 0.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(np.arange(L), [f"layer {i}" for i in range(L)], fontsize=8)
        ax.set_title(f"{'first' if choice == 0 else 'second'} choice (in a cell: expert, then its weight)", fontsize=9)
        if T <= MAX_ANNOTATED_CELLS:
            for layer in range(L):
                for t in range(T):
                    text = f"{routing.experts[layer, t, choice]}\n{routing.weights[layer, t, choice]:.2f}"
                    ax.text(t, layer, text, ha="center", va="center", fontsize=6)
    label_tokens(axes[1], routing.labels, "x")
    fig.colorbar(image, ax=list(axes), ticks=range(E), label="expert", shrink=0.8)
    fig.suptitle(f"PhiMoE routing: {routing.source}", fontsize=10)
    return fig
