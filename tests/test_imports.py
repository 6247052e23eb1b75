"""The package's shape, read from the source so it cannot regress unnoticed:

- imports point one way, `benchmarks` → `value_models` → `vgs` (the installed wheel holds only
  `vgs` and `value_models`; `benchmarks` runs from the repository), and no module imports
  itself back through others (an import cycle), counting imports inside functions too;
- every third-party module the code imports is a declared dependency (pyproject.toml);
- the old paths a user could have imported still work, with a DeprecationWarning.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"vgs": 0, "value_models": 1, "benchmarks": 2}  # a module may import its floor or lower


def _modules() -> dict[str, Path]:
    mods = {}
    for top in FLOORS:
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = p
    return mods


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (functions included), except under
    `if TYPE_CHECKING:` (annotations only, never executed). `from a import b` counts `a` and
    `a.b` (b may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def test_imports_point_one_way():
    graph = _graph()
    up = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
          if FLOORS[t.split(".")[0]] > FLOORS[m.split(".")[0]]]
    assert not up, "imports must point benchmarks -> value_models -> vgs; these point back up:\n" + "\n".join(up)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _declared() -> dict[str, set[str]]:
    """Distribution names pyproject declares: for the package (base, the engine extras and the
    optional `track` extra its guarded imports need) and for tests/benchmarks (plus `dev`)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    extras = {k: {name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    base = {name(r) for r in project["dependencies"]} | extras["cpu"] | extras["gpu"]
    track = extras.get("track", set())
    return {"package": base | track, "dev": base | track | extras.get("dev", set())}


def _third_party(top: str) -> set[str]:
    own = set(FLOORS) | {"tests", "conftest", "fakes"}
    out = set()
    for p in (ROOT / top).rglob("*.py"):
        for mod in _imports(p):
            first = mod.split(".")[0]
            if first not in own and first not in sys.stdlib_module_names and first != "__future__":
                out.add(first)
    return out


@pytest.mark.parametrize("tops,kind", [(("vgs", "value_models"), "package"), (("tests", "benchmarks"), "dev")])
def test_every_third_party_import_is_declared(tops, kind):
    dists = importlib.metadata.packages_distributions()
    declared = _declared()[kind]
    missing = []
    for top in tops:
        for mod in sorted(_third_party(top)):
            names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
            if not names & declared:
                missing.append(f"{top}: import {mod} (distribution {', '.join(sorted(names))})")
    assert not missing, f"not declared in pyproject.toml ({kind}):\n" + "\n".join(missing)


def test_dependencies_have_lower_bounds():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for k, v in project["optional-dependencies"].items() for r in v]
    unbounded = [r for r in reqs if not re.search(r"(>=|==)", r)]
    assert not unbounded, f"dependencies without a lower bound: {unbounded}"


@pytest.mark.parametrize("old,new", [("value_models.modeling", "vgs.modeling"),
                                     ("value_models.vllm_plugin", "vgs.vllm_plugin"),
                                     ("value_models.vllm_model", "vgs.vllm_model")])
def test_old_import_paths_warn_and_are_the_new_modules(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=re.escape(f"import {new} instead")):
        mod = importlib.import_module(old)
    target = importlib.import_module(new)
    assert mod is target
    public = [n for n in vars(target) if not n.startswith("_")]
    assert public and all(getattr(mod, n) is getattr(target, n) for n in public)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(f"from {old} import {public[0]}", {})  # the cached alias imports silently
