"""`python -m minislm rope`: the rotary embedding's frequencies, from config.json alone.

RoPE turns each pair of dimensions (i, i + d/2) of every query and key by the
angle position * inv_freq[i] (rotate-half pairing, `model.apply_rope`). Pair 0
turns fastest (a wavelength of 2 pi tokens); the last pairs turn so slowly that
they barely move within the context: they carry "roughly where", the first
pairs "exactly where". LongRoPE divides each frequency by a factor, one set for
sequences up to `original_max_position_embeddings` tokens and one beyond, and
scales cos and sin by an attention factor (`model.rope_tables`).
"""

from dataclasses import dataclass

import numpy as np

from ..commands import model_argument
from ..config import load_config
from ..hub import resolve_model_dir
from ..model import rope_inv_freq
from .inputs import check_output_path, shown_path


@dataclass
class RopeTable:
    rotary_dim: int
    head_dim: int
    inv_freq_short: np.ndarray  # (d/2,) radians per token
    inv_freq_long: np.ndarray | None  # LongRoPE only
    short_factor: np.ndarray | None
    long_factor: np.ndarray | None

    @property
    def wavelength_short(self) -> np.ndarray:
        return 2 * np.pi / self.inv_freq_short.astype(np.float64)

    @property
    def wavelength_long(self) -> np.ndarray | None:
        return None if self.inv_freq_long is None else 2 * np.pi / self.inv_freq_long.astype(np.float64)


def rope_table(config) -> RopeTable:
    rope = config.rope
    long = rope.kind == "longrope"
    return RopeTable(
        rope.rotary_dim,
        config.head_dim,
        rope_inv_freq(rope, long=False),
        rope_inv_freq(rope, long=True) if long else None,
        np.array(rope.short_factor) if long else None,
        np.array(rope.long_factor) if long else None,
    )


def format_table(table: RopeTable, context: int, original: int) -> str:
    """One row per pair. 'turns' = full turns over the positions where that factor set
    applies: up to `original` tokens for LongRoPE's short set, `context` otherwise."""
    half = table.rotary_dim // 2
    long = table.inv_freq_long is not None
    short = "short " if long else ""
    head = f"{'pair':>4}  {'dims':>9}  {short + 'inv_freq':>14}  {short + 'wavelength':>16}  {short + 'turns':>11}"
    if long:
        head += f"  {'short f':>8}  {'long f':>8}  {'long inv_freq':>13}  {'long wavelength':>15}  {'long turns':>10}"
    lines = [head]
    for i in range(half):
        line = (
            f"{i:>4}  {f'{i},{i + half}':>9}  {table.inv_freq_short[i]:>14.4g}  {table.wavelength_short[i]:>16.5g}"
            f"  {(original if long else context) / table.wavelength_short[i]:>11.4g}"
        )
        if long:
            line += (
                f"  {table.short_factor[i]:>8.4g}  {table.long_factor[i]:>8.4g}  {table.inv_freq_long[i]:>13.4g}"
                f"  {table.wavelength_long[i]:>15.5g}  {context / table.wavelength_long[i]:>10.4g}"
            )
        lines.append(line)
    return "\n".join(lines)


def describe(config) -> list[str]:
    rope = config.rope
    lines = [
        f"{rope.kind} RoPE, theta {rope.theta:g}: {rope.rotary_dim} of each head's {config.head_dim} dims rotate "
        f"in {rope.rotary_dim // 2} pairs (i, i + {rope.rotary_dim // 2}), rotate-half"
        + ("" if rope.rotary_dim == config.head_dim else f"; dims {rope.rotary_dim}..{config.head_dim - 1} pass through"),
        "wavelength = 2 pi / inv_freq tokens for one full turn; turns = how many of them fit in the context"
        + (" the factor set is used for (short: original_max_position_embeddings, long: max_position_embeddings)"
           if rope.kind == "longrope" else " (max_position_embeddings)"),
    ]
    if rope.kind == "longrope":
        n = rope.original_max_position_embeddings
        lines += [
            f"LongRoPE: inv_freq = theta^(-2i/d) / factor[i]; the short factors while the sequence is at most "
            f"{n} tokens (original_max_position_embeddings), the long ones beyond",
            f"attention scale (multiplies cos and sin, so q.k by its square): short {rope.short_scale:.6g}, "
            f"long {rope.long_scale:.6g}",
            f"the switch: a prompt of {n + 1}+ tokens uses the long factors at every position; a generation "
            f"crosses when its sequence reaches {n + 1} tokens, and minislm then runs the whole sequence again "
            "with the long factors (Model.forward, docs/architecture.md)",
        ]
    return lines


def run_rope(args) -> int:
    check_output_path(args.png, "--png")
    if args.png:
        from .plots import require_matplotlib

        require_matplotlib()
    folder = resolve_model_dir(model_argument(args), args.revision)
    config = load_config(folder)  # config.json alone: no weights are read
    table = rope_table(config)
    print(f"{shown_path(folder)}: context {config.max_position_embeddings} tokens")
    for line in describe(config):
        print(line)
    print(format_table(table, config.max_position_embeddings, config.rope.original_max_position_embeddings))
    if args.png:
        from .plots import rope_figure, save

        save(rope_figure(table, config), args.png, "--png")
    return 0


