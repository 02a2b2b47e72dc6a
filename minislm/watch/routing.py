"""`python -m minislm routing PROMPT` (or `--from FILE.json`): PhiMoE's choices as a grid.

Every layer's router sends every token to 2 of its E experts (`moe.sparsemixer`).
Run on PROMPT, the grid shows the choice made at each prompt position; read from
`generate --save-experts FILE.json`, it shows for each generated token the choice
at the position before it, the forward pass whose logits it was drawn from.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from ..trace import Recorder
from .inputs import check_output_path, model_and_prompt, picture_tokens, pieces

TOKENS_PER_BLOCK = 24  # columns of the text grid before it wraps


@dataclass
class Routing:
    """experts[layer, token] = (first, second) choice; weights alike."""

    labels: list[str]  # one per token column
    experts: np.ndarray  # (L, T, 2) int
    weights: np.ndarray  # (L, T, 2) float
    num_experts: int
    source: str  # what the columns are

    def first(self, n: int) -> "Routing":
        return Routing(self.labels[:n], self.experts[:, :n], self.weights[:, :n], self.num_experts, self.source)


def routing_of_prompt(model, ids: np.ndarray) -> Routing:
    trace = Recorder(names=("experts", "expert_weights"))
    model.logits(ids, trace)
    return Routing(
        pieces(model.tokenizer, ids),
        np.stack(trace.per_layer("experts")),
        np.stack(trace.per_layer("expert_weights")),
        model.config.num_local_experts,
        "the choice at each prompt position",
    )


def routing_from_json(path: str) -> Routing:
    """A `generate --save-experts` file, checked before use: one line per problem."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        tokens = record["tokens"]
        experts = np.array([t["experts"] for t in tokens], dtype=np.int64)  # (T, L, 2)
        weights = np.array([t["weights"] for t in tokens], dtype=np.float64)
        labels = [str(t["piece"]) for t in tokens]
        num_experts = int(record["num_local_experts"])
    except FileNotFoundError:
        raise MinislmError(f"--from: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinislmError(f"--from: cannot read {path} ({e})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MinislmError(f"--from: {path} is not a `generate --save-experts` file ({type(e).__name__}: {e})") from None
    if not tokens:
        raise MinislmError(f"--from: {path} has no tokens")
    if experts.ndim != 3 or experts.shape[2] != 2 or weights.shape != experts.shape:
        raise MinislmError(f"--from: {path}: each token needs experts and weights as [layer][2] lists of one size")
    if experts.min() < 0 or experts.max() >= num_experts:
        raise MinislmError(f"--from: {path}: expert ids must lie in [0, {num_experts})")
    return Routing(
        labels, experts.transpose(1, 0, 2), weights.transpose(1, 0, 2), num_experts,
        "for each generated token, the choice at the position before it",
    )


def format_grid(routing: Routing) -> str:
    L, T, _ = routing.experts.shape
    lines = [f"{L} layers x {T} tokens, {routing.num_experts} experts per layer; {routing.source}",
             "cell = first/second expert; each row is a layer"]
    for start in range(0, T, TOKENS_PER_BLOCK):
        cols = range(start, min(T, start + TOKENS_PER_BLOCK))
        lines.append(f"{'token':<9}" + "".join(f"{t:>6}" for t in cols))
        lines.append(f"{'':<9}" + "".join(f"{routing.labels[t][:5]:>6}" for t in cols))
        for layer in range(L):
            lines.append(
                f"{f'layer {layer}':<9}" + "".join(f"{'%d/%d' % tuple(routing.experts[layer, t]):>6}" for t in cols)
            )
    lines.append("share of the token slots each expert took, per layer (first + second choice):")
    for layer in range(L):
        counts = np.bincount(routing.experts[layer].ravel(), minlength=routing.num_experts)
        share = counts / counts.sum()
        lines.append(f"{f'layer {layer}':<9}" + "  ".join(f"e{e} {share[e]:.0%}" for e in range(routing.num_experts)))
    return "\n".join(lines)


def run_routing(args) -> int:
    if args.from_json is not None and args.prompt is not None:
        raise MinislmError("give either PROMPT or --from FILE, not both")
    if args.from_json is not None:
        check_output_path(args.png, "--png")
        if args.png:
            from .plots import require_matplotlib

            require_matplotlib()
        routing = routing_from_json(args.from_json)
    elif args.prompt is not None:
        model, ids = model_and_prompt(args)
        if model.config.model_type != "phimoe":
            raise MinislmError(f"routing: {model.path} is a {model.config.model_type} model, which has no experts (PhiMoE only)")
        routing = routing_of_prompt(model, ids)
    else:
        raise MinislmError('routing needs PROMPT or --from FILE (from `generate --save-experts FILE`)')
    print(format_grid(routing))
    if args.png:
        from .plots import routing_figure, save

        n = picture_tokens(routing.experts.shape[1], "the routing picture")
        save(routing_figure(routing.first(n)), args.png, "--png")
    return 0
