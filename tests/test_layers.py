"""The package's layers (docs/architecture.md), read from the source: no import circle,
and no import from a lower layer up to a higher one beyond a short allow-list.

Every `import` counts, at module level or inside a function: a lazy import is still
a dependency a reader has to follow, and a circle hidden behind one is still a
circle. `python tools/import_graph.py` prints the graph this test reads.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("foundation", ["minislm.errors", "minislm.config", "minislm.phi3small_config", "minislm.vision.config",
                    "minislm.multimodal.config", "minislm.sampling", "minislm.logprobs", "minislm.grammar", "minislm.trace",
                    "minislm.hub", "minislm.text_input", "minislm.compile_notice", "minislm.chat_sandbox",
                    "minislm.reasoning"]),
    ("storage and kernels", ["minislm.kernels", "minislm.weights", "minislm.streaming", "minislm.uncached", "minislm.cache",
                             "minislm.tokenizer", "minislm.tiktoken_bpe", "minislm.formats"]),
    ("model math", ["minislm.model", "minislm.moe", "minislm.blocksparse", "minislm.lora"]),
    ("vision", ["minislm.vision", "minislm.multimodal"]),
    ("runtime", ["minislm.finite", "minislm.generate", "minislm.speculative", "minislm.beam", "minislm.policy",
                 "minislm.runtime", "minislm.batch", "minislm.quantize", "minislm.load"]),
    ("commands", ["minislm.flags", "minislm.commands", "minislm.media_commands", "minislm.perplexity", "minislm.verify",
                  "minislm.openai_api", "minislm.serve", "minislm.serve_media", "minislm.watch", "minislm.bench"]),
    ("entry points", ["minislm.cli", "minislm.__main__", "minislm"]),
]

# Imports that point up a layer on purpose, each with the reason. At most 5.
ALLOWED_UPWARD = {
    # The bench times `minislm quantize` exactly as the command line runs it, flags and all.
    ("minislm.bench.worker", "minislm.cli"),
}


def module_files() -> dict[str, Path]:
    """minislm's modules by dotted name; kernels/ is installed as minislm.kernels."""
    files = {}
    for top in ("minislm", "kernels"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[0] == "kernels":
                parts.insert(0, "minislm")
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known) -> dict[str, int]:
    """The minislm modules `name` imports anywhere in its source -> the first line that does."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            # `from . import cpu` imports the module minislm.kernels.cpu, not the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    return {name: imports_of(name, path, files) for name, path in files.items()}


def layer_of(module: str) -> int:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py"
    return best


def circles(graph) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph) -> list[tuple[str, str, int]]:
    return sorted((a, b, line) for a, deps in graph.items() for b, line in deps.items() if layer_of(b) > layer_of(a))


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_imports_point_down_except_the_allowed_few():
    assert len(ALLOWED_UPWARD) <= 5
    upward = [(a, b) for a, b, _ in upward_imports(import_graph())]
    unexpected = [f"{a} -> {b}" for a, b in upward if (a, b) not in ALLOWED_UPWARD]
    assert unexpected == []
    stale = [pair for pair in ALLOWED_UPWARD if pair not in upward]
    assert stale == [], "allowed upward imports that no longer happen: remove them from ALLOWED_UPWARD"


def test_the_model_imports_nothing_above_the_math():
    model = layer_of("minislm.model")
    assert {b for b in import_graph()["minislm.model"] if layer_of(b) > model} == set()


def test_the_checks_find_what_they_should():
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]
    assert circles({"a": {"b": 1}, "b": {}}) == []
    assert layer_of("minislm.kernels.packed") < layer_of("minislm.model") < layer_of("minislm.cli")
    assert layer_of("minislm.vision.config") < layer_of("minislm.vision.tower")
