"""The floor plan holds: faces over four wings over the optimizers, no import cycles, a plan wing without torch.

The rules (README, "How the code is laid out"): ``api``/``cli`` may import anything; ``chat`` may import ``export``,
``train`` and ``plan``; ``export`` may import ``train`` and ``plan``; ``train`` may import ``plan``; ``plan`` imports
neither; ``optim`` imports only ``errors``. Every import counts, also those inside functions, since a late import is
still a dependency.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetune"
FACES = {"edgetune.api", "edgetune.cli", "edgetune.cli_chat", "edgetune.cli_output", "edgetune.__main__"}
BASE = {"edgetune", "edgetune.errors"}
MAY_IMPORT = {
    "face": {"face", "chat", "export", "train", "plan", "optim", "base"},
    "chat": {"chat", "export", "train", "plan", "optim", "base"},
    "export": {"export", "train", "plan", "optim", "base"},
    "train": {"train", "plan", "optim", "base"},
    "plan": {"plan", "optim", "base"},
    "optim": {"optim", "base"},
    "base": {"base"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in FACES:
        return "face"
    if module in BASE:
        return "base"
    return module.split(".")[1]


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every edgetune module ``path`` imports, anywhere in the file; ``from a import b`` counts a.b if it is one."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {module for module in found if module in known}


def graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    edges = {name: imported(path, name, known) - {name} for name, path in paths.items()}
    # The package root re-exports the API lazily; that facade is not a dependency of the wings.
    edges["edgetune"] = set()
    for name in edges:
        # Importing a.b.c imports a and a.b first; those are packages, not dependencies of the code.
        edges[name] = {m for m in edges[name] if not (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    return edges


def test_every_module_sits_in_a_wing_or_is_a_face():
    loose = [name for name in graph() if name.count(".") == 1 and layer(name) not in ("face", "base", "optim")]
    wings = {"edgetune.plan", "edgetune.train", "edgetune.export", "edgetune.chat", "edgetune.optim"}
    assert sorted(set(loose) - wings) == []


def test_no_module_imports_a_layer_above_its_own():
    broken = [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, targets in graph().items()
        for target in targets
        if layer(target) not in MAY_IMPORT[layer(name)]
    ]
    assert broken == []


def test_the_import_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_a_broken_rule_and_a_cycle(tmp_path, monkeypatch):
    """The two graph tests can fail: a plan module importing train, and two modules importing each other."""
    fake = tmp_path / "edgetune"
    (fake / "plan").mkdir(parents=True)
    (fake / "train").mkdir()
    for folder in (fake, fake / "plan", fake / "train"):
        (folder / "__init__.py").write_text("")
    (fake / "plan" / "a.py").write_text("from edgetune.train.b import x\n")
    (fake / "train" / "b.py").write_text("def f():\n    from edgetune.plan import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    edges = graph()
    assert edges["edgetune.plan.a"] == {"edgetune.train.b"} and edges["edgetune.train.b"] == {"edgetune.plan.a"}
    with pytest.raises(AssertionError):
        test_no_module_imports_a_layer_above_its_own()
    with pytest.raises(AssertionError):
        test_the_import_graph_has_no_cycle()


def test_the_plan_wing_imports_no_torch_when_loaded():
    modules = sorted(name for name in graph() if layer(name) == "plan") + ["edgetune"]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
