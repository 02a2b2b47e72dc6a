"""Print minislm's import graph by layer: circles, and imports that point up a layer.

    python tools/import_graph.py            # the summary
    python tools/import_graph.py --all      # every module and what it imports

The layers and the reading of the source are tests/test_layers.py's, which fails on
any circle or unlisted upward import; this prints what it sees.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_layers import LAYERS, circles, import_graph, layer_of, upward_imports  # noqa: E402


def main() -> int:
    graph = import_graph()
    if "--all" in sys.argv:
        for module in sorted(graph, key=lambda m: (layer_of(m), m)):
            print(f"[{LAYERS[layer_of(module)][0]}] {module} -> {', '.join(sorted(graph[module])) or '-'}")
    found = circles(graph)
    print(f"{len(graph)} modules, {sum(len(d) for d in graph.values())} imports")
    print(f"circles: {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
    upward = upward_imports(graph)
    print(f"imports up a layer: {len(upward)}")
    for a, b, line in upward:
        print(f"  {a}:{line} -> {b}  ({LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
