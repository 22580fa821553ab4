"""The package's structure (issue: the house by stage): the layer contracts of ``.importlinter`` hold
(lint-imports, which the README's test command also runs), no two modules import each other through
any chain (function-level and TYPE_CHECKING imports included), and only a few entry modules sit
directly under ``opdlm_megatron/``."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _graph():
    import grimp

    return grimp.build_graph("opdlm_megatron", cache_dir=None)


def test_no_import_cycle_between_modules():
    graph = _graph()
    modules = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & set(modules) for m in modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    # a package's __init__ importing its own submodules is not a cycle between modules
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert cycles == [], cycles


def test_layer_contracts_hold():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([lint, "--config", str(REPO_ROOT / ".importlinter")], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


def test_few_modules_directly_under_the_package():
    top = [n for n in os.listdir(REPO_ROOT / "opdlm_megatron") if n.endswith(".py")]
    assert len(top) <= 10, top
