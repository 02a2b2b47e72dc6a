"""The results as people read them: a Markdown table, the goals, the profile, a plot.

The table is Markdown so the same text reads in a terminal and pastes into
docs/performance.md. Ratios compare rows of the same run only: on a shared
machine absolute figures drift between runs, ratios much less.
"""

from .engines import ENGINES, PREFILL_PEER, engine_named
from .profile import PARTS

GB = 1e9
GiB = 2**30

# The decode goals: minislm row >= peer row, in decode tok/s.
DECODE_GOAL_ROWS = [(e.name, e.decode_peer) for e in ENGINES if e.decode_peer]
INT4_ROWS = [e.name for e in ENGINES if e.family == "minislm" and e.weights == "int4"]
ROOFLINE_GOAL = 0.80  # int4 decode at >= 80 % of the measured read bandwidth


def rows_by_name(results: dict) -> dict:
    return {row["engine"]: row for row in results["engines"]}


def is_moe(results: dict) -> bool:
    return results["model"]["config"]["model_type"] == "phimoe"


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def ratio(ours: dict, peer: dict | None, key) -> float | None:
    if peer is None or ours.get("status") != "ok" or peer.get("status") != "ok":
        return None
    a, b = key(ours), key(peer)
    return a / b if a and b else None


def decode_tok_s(row):
    return row.get("decode_tok_s")


def first_prefill(results):
    length = str(results["settings"]["prompt_lengths"][0])
    return lambda row: row.get("prefill_tok_s", {}).get(length)


def roofline(row: dict, bandwidth_gbs: float | None) -> float | None:
    """Fraction of the measured read bandwidth this engine's decode streams."""
    if row.get("status") != "ok" or not bandwidth_gbs or not row.get("decode_tok_s"):
        return None
    return row["decode_bytes_per_token"] * row["decode_tok_s"] / (bandwidth_gbs * GB)


def engine_table(results: dict) -> str:
    lengths = results["settings"]["prompt_lengths"]
    moe = is_moe(results)
    bandwidth = results["bandwidth"]["roofline_gbs"]
    rows = rows_by_name(results)
    head = ["engine", "load s", f"TTFT ms @{lengths[0]}"]
    head += [f"prefill tok/s @{n}" for n in lengths]
    head += ["decode tok/s", "decode vs peer", f"prefill vs {PREFILL_PEER}", "peak RSS GiB", "GB read/token"]
    head += ["B/active param"] if moe else []
    head += ["GB/s", "% roofline", "other load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["engines"]:
        name = row["engine"]
        if row["status"] != "ok":
            lines.append(f"| {name} | {row['status']} |" + " |" * (len(head) - 2))
            continue
        peer_name = engine_named(name).decode_peer
        decode_ratio = ratio(row, rows.get(peer_name), decode_tok_s)
        prefill_ratio = ratio(row, rows.get(PREFILL_PEER), first_prefill(results)) if name.startswith("minislm") else None
        per_token = row["decode_bytes_per_token"]
        cells = [name, fmt(row["load_s"]), fmt(row["ttft_ms"][str(lengths[0])], 0)]
        cells += [fmt(row["prefill_tok_s"].get(str(n))) for n in lengths]
        cells += [fmt(row.get("decode_tok_s"), 2)]
        cells += [f"{decode_ratio:.2f}x {peer_name.split('-', 1)[1]}" if decode_ratio else ""]
        cells += [f"{prefill_ratio:.2f}x" if prefill_ratio else ""]
        cells += [fmt(row["peak_rss_bytes"] / GiB, 2), fmt(per_token / GB, 3)]
        cells += [fmt(per_token / results["model"]["active_params"], 2)] if moe else []
        frac = roofline(row, bandwidth)
        cells += [fmt(per_token * (row.get("decode_tok_s") or 0) / GB), fmt(frac * 100 if frac else None, 0)]
        cells += [fmt(row.get("other_load"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {row['engine']}: {row['status']}: {row.get('reason', '')}"
             for row in results["engines"] if row["status"] != "ok"]
    return "\n".join(lines + ([""] + notes if notes else []))


def goals(results: dict) -> list[str]:
    """One line per goal of the issue: the figures, the ratio, met or not (or why unknown)."""
    rows = rows_by_name(results)
    bandwidth = results["bandwidth"]["roofline_gbs"]
    length = results["settings"]["prompt_lengths"][0]
    out = []

    def judged(name, peer):
        for row_name in (name, peer):
            if row_name not in rows:
                return f"not measured ({row_name} not in --engines)"
            if rows[row_name]["status"] != "ok":
                return f"not measured ({row_name} {rows[row_name]['status']})"
        return None

    for name, peer in DECODE_GOAL_ROWS:
        why = judged(name, peer)
        if why:
            out.append(f"{name} decode >= {peer}: {why}")
            continue
        a, b = rows[name]["decode_tok_s"], rows[peer]["decode_tok_s"]
        out.append(f"{name} decode >= {peer}: {a:.2f} vs {b:.2f} tok/s = {a / b:.2f}x "
                   f"({'met' if a >= b else 'not met'})")
    for name in INT4_ROWS:
        if rows.get(name, {}).get("status") == "ok":
            frac = roofline(rows[name], bandwidth)
            out.append(f"{name} decode >= {ROOFLINE_GOAL:.0%} of roofline: {frac:.0%} "
                       f"({'met' if frac >= ROOFLINE_GOAL else 'not met'})")
        else:
            out.append(f"{name} decode >= {ROOFLINE_GOAL:.0%} of roofline: not measured")
    prefill = first_prefill(results)
    for name in (n for n in rows if n.startswith("minislm")):
        why = judged(name, PREFILL_PEER)
        if why:
            out.append(f"{name} prefill @{length} >= {PREFILL_PEER}: {why}")
            continue
        a, b = prefill(rows[name]), prefill(rows[PREFILL_PEER])
        out.append(f"{name} prefill @{length} >= {PREFILL_PEER}: {a:.1f} vs {b:.1f} tok/s = {a / b:.2f}x "
                   f"({'met' if a >= b else 'not met'})")
    return out


def profile_table(profile: dict) -> str:
    """Per-part milliseconds: prefill of the whole prompt, and per decoded token."""
    pre, dec = profile["prefill"], profile["decode_per_token"]
    lines = [f"{profile['engine']}: prefill of {profile['prompt_tokens']} tokens, "
             f"decode averaged over {profile['decode_tokens']} tokens",
             "",
             "| part | prefill ms | prefill % | decode ms/token | decode % | decode GB/s |",
             "|---|---|---|---|---|---|"]
    for part in PARTS:
        p, d = pre["parts_s"].get(part, 0.0), dec["parts_s"].get(part, 0.0)
        if p == d == 0.0:  # e.g. the router of a dense model
            continue
        nbytes = profile["part_bytes"].get(part)
        rate = fmt(nbytes / d / GB) if nbytes and d > 0 else ""
        lines.append(f"| {part} | {p * 1e3:.1f} | {p / pre['wall_s']:.0%} | {d * 1e3:.2f} | "
                     f"{d / dec['wall_s']:.0%} | {rate} |")
    lines.append(f"| total | {pre['wall_s'] * 1e3:.1f} | 100% | {dec['wall_s'] * 1e3:.2f} | 100% | |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    m, b, s = results["machine"], results["bandwidth"], results["settings"]
    model = results["model"]
    lines = [
        f"## minislm bench: {model['name']} ({model['params'] / 1e9:.2f} B params"
        + (f", {model['active_params'] / 1e9:.2f} B active per token" if is_moe(results) else "")
        + ")",
        "",
        f"- machine: {m['cpu']} ({m['cores']} cores, {m['ram_gib']:.0f} GiB), load average "
        f"{m['loadavg_before'][0]:.2f} before / {m['loadavg_after'][0]:.2f} after; other processes used "
        f"{m.get('other_load_at_start')} cores at the start",
        f"- command: `{results['command']}` ({results['date']})",
        f"- threads: {s['threads']}; prompts {', '.join(map(str, s['prompt_lengths']))} tokens (random ids); "
        f"decode {s['new_tokens']} new tokens after the first prompt, greedy",
        f"- read bandwidth (Numba parallel sum, {b['before'].get('array_gib', '?')} GiB): "
        f"{fmt(b['before'].get('gbs'))} GB/s before, {fmt(b['after'].get('gbs'))} GB/s after the engines "
        f"(other load {b['before'].get('other_load')} / {b['after'].get('other_load')} cores); "
        f"roofline uses {fmt(b['roofline_gbs'])} GB/s",
        "- other load: cores kept busy by other processes (and the hypervisor) while that row ran; "
        "well above 0 means the row measured contention, not the engine",
        "",
        engine_table(results),
        "",
        "Goals:",
        *[f"- {line}" for line in goals(results)],
    ]
    for profile in results.get("profiles", []):
        lines += ["", "Profile: " + profile_table(profile) if profile.get("status") == "ok"
                  else f"Profile {profile.get('engine')}: {profile.get('status')}: {profile.get('reason', '')}"]
    return "\n".join(lines)


def plot(results: dict, path) -> str | None:
    """Bar chart of prefill and decode tok/s; returns why not, if it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = [r for r in results["engines"] if r["status"] == "ok"]
    if not rows:
        return "no engine ran: no plot"
    length = str(results["settings"]["prompt_lengths"][0])
    colors = {"minislm": "#2b6cb0", "llama.cpp": "#c05621", "transformers": "#6b46c1"}
    names = [r["engine"] for r in rows]
    bar_colors = [colors[engine_named(n).family] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.8), sharey=True)
    panels = [(f"prefill tok/s (prompt {length})", [r["prefill_tok_s"][length] for r in rows]),
              ("decode tok/s", [r.get("decode_tok_s") or 0 for r in rows])]
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=bar_colors)
        ax.set_title(title)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
        ax.margins(x=0.15)
    axes[0].invert_yaxis()  # first engine on top (the axes share y: invert once)
    fig.suptitle(f"{results['model']['name']}, {results['settings']['threads']} threads, "
                 f"{results['machine']['cpu']}, {results['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
