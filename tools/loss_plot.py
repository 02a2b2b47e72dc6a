"""The loss curve for docs/training.md: train and held-out nats per character against step."""

from pathlib import Path


def plot_losses(log: list[dict], final_heldout: float, path: Path) -> None:
    """Plot a training log (records with step, train/held-out nats per char) to a small PNG.

    Train loss is the mean of the batches since the previous point, measured
    with dropout on and converted with the training text's chars per token;
    held-out loss uses non-overlapping windows, so it sits a little above the
    final sliding-window score, drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_nats_per_char"]) for r in log if r["train_nats_per_char"]]
    heldout = [(r["step"], r["heldout_nats_per_char"]) for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(*zip(*train), label="train (batches, dropout on)")
    ax.plot(*zip(*heldout), marker="o", markersize=3, label="held-out plays")
    ax.axhline(final_heldout, color="gray", linestyle="--", linewidth=1,
               label=f"final held-out, sliding window: {final_heldout:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_ylim(top=min(4.0, max(v for _, v in heldout) + 0.1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
