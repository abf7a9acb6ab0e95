"""The package's import structure: test fixtures stay out of it, and every module imports on its own.

- No module under ``tvq_lightning/`` imports ``tvq_lightning.testing`` (at any level, in any
  function): that module is for the tests only.
- The module-level imports between ``tvq_lightning`` modules form no cycle (registries import
  their members lazily, inside functions, which is allowed).
- In a fresh interpreter, each module imports when it is the first ``tvq_lightning`` module
  imported, and all of them import in sorted and in reverse order.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tvq_lightning

ROOT = Path(tvq_lightning.__file__).parent
PKG = "tvq_lightning"
TESTING = f"{PKG}.testing"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
IMPORTABLE = sorted(m for m in MODULES if not m.endswith("__main__"))


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute names an import statement brings in (modules, and ``from X import name`` as ``X.name``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = node.module if not node.level else ".".join(filter(None, [base, node.module]))
    return [source] + [f"{source}.{a.name}" for a in node.names]


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    return {name for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in _imported(module, path, node)}


def test_no_package_module_imports_the_test_fixtures():
    offenders = [f"{m} ({MODULES[m].relative_to(ROOT.parent)})" for m in MODULES if m != TESTING
                 and any(n == TESTING or n.startswith(TESTING + ".") for n in _imports(m, MODULES[m], False))]
    assert not offenders, f"modules importing {TESTING}: {', '.join(offenders)}"


def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for m, path in MODULES.items():
        deps = set()
        for name in _imports(m, path, True):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                # a module's own packages are already being imported when it runs: no cycle
                if dep in MODULES and dep != m and not m.startswith(dep + "."):
                    deps.add(dep)
        graph[m] = deps

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return trail + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "module-level import cycle: " + " -> ".join(cycles[0])


def test_shipped_configs_name_no_test_fixture():
    repo = ROOT.parent
    files = [p for d in ("configs", "callbacks") for p in sorted((repo / d).glob("*")) if p.suffix in (".yaml", ".md")]
    offenders = [str(p.relative_to(repo)) for p in files if TESTING in p.read_text()]
    assert not offenders, f"configs naming {TESTING}: {', '.join(offenders)}"


def test_testing_reexports_the_package_objects():
    from tvq_lightning import testing
    from tvq_lightning.data.synthetic import synthetic_finetunes, synthetic_task_vector
    from tvq_lightning.models import TinyEncoder
    from tvq_lightning.models.tiny import heavy_tailed_, tiny_pretrained
    from tvq_lightning.store.st_stream import save_safetensors

    for obj in (synthetic_finetunes, synthetic_task_vector, TinyEncoder, heavy_tailed_, tiny_pretrained, save_safetensors):
        assert getattr(testing, obj.__name__) is obj


# Third-party packages are imported once in the parent; each forked child then imports one
# tvq_lightning module first (nothing of tvq_lightning is loaded before the fork).
_FORK_EACH = """
import importlib, os, sys
for dep in ("numpy", "torch", "lightning.pytorch", "numba", "safetensors", "jsonargparse"):
    try:
        importlib.import_module(dep)
    except ImportError:
        pass
assert not any(m == "tvq_lightning" or m.startswith("tvq_lightning.") for m in sys.modules)
failed = []
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            msg = b""
        except BaseException as e:
            msg = f"{name}: {type(e).__name__}: {e}".encode()
        os.write(w, msg[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    if msg:
        failed.append(msg)
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT.parent)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_module_imports_first_in_a_fresh_interpreter():
    res = _run(_FORK_EACH, *IMPORTABLE)
    assert res.returncode == 0, f"modules that fail when imported first:\n{res.stdout}{res.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_all_modules_import_in_either_order(order):
    names = IMPORTABLE if order == "sorted" else IMPORTABLE[::-1]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    res = _run(code, *names)
    assert res.returncode == 0, res.stderr[-3000:]
