"""dvc.yaml's code dependencies follow the import graph: a change to any module a step imports
(directly or not, at the top or inside a function) re-runs that step, and nothing else does.

The dependencies are written by hand in dvc.yaml (so that `dvc repro` re-runs only what a change
touches); this test derives them from the code and fails, naming the missing files, when they drift.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "kdpipe"

# Modules that cannot change what a step writes, with the reason; every other imported module is a
# dependency. params.py is covered by the stages' `params:` (params.yaml lists every key, tested).
NO_EFFECT_ON_OUTPUTS = {
    "__init__.py": "the version string (recorded as metadata)",
    "errors.py": "error types and their messages",
    "progress.py": "progress bars",
    "atomic.py": "how a file is written (atomically), not what",
    "mapped.py": "which mapped pages stay resident in memory, not what is read or written",
    "layout.py": "default paths, which dvc.yaml's outs name themselves",
    "params.py": "the schema; the values are the stages' params",
}


def _module_file(dotted: str) -> Path | None:
    path = SRC.joinpath(*dotted.split(".")[1:])
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imported_files(path: Path) -> set[Path]:
    """kdpipe modules that ``path`` imports anywhere in its body (lazy imports included)."""
    package = ["kdpipe", *path.relative_to(SRC).with_suffix("").parts[:-1]]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.startswith("kdpipe"):
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("kdpipe"))
    return {file for name in names if (file := _module_file(name))}


def import_closure(path: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_imported_files(current))
    return seen


def _stages():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    code = next(v["code"] for v in dvc["vars"] if "code" in v)
    for name, stage in dvc["stages"].items():
        step = stage["cmd"].split()[1]  # "kdpipe <step> ..."
        deps = {dep.replace("${code}", code) for dep in stage.get("deps", [])}
        yield name, step, deps, code


def test_every_stage_depends_on_every_module_its_step_imports():
    missing = {}
    for name, step, deps, code in _stages():
        needed = {f"{code}/{p.relative_to(SRC).as_posix()}" for p in import_closure(SRC / "steps" / f"{step}.py")
                  if p.name not in NO_EFFECT_ON_OUTPUTS or p.parent != SRC}
        if needed - deps:
            missing[name] = sorted(needed - deps)
    assert missing == {}, "dvc.yaml stages lack code dependencies (add them to the stage's deps)"


def test_no_stage_depends_on_code_its_step_does_not_import():
    extra = {}
    for name, step, deps, code in _stages():
        imported = {f"{code}/{p.relative_to(SRC).as_posix()}" for p in import_closure(SRC / "steps" / f"{step}.py")}
        unused = sorted(d for d in deps if d.startswith(code + "/") and d not in imported)
        if unused:
            extra[name] = unused
    assert extra == {}, "dvc.yaml stages depend on modules their step never imports (they re-run for nothing)"


def test_the_import_graph_sees_lazy_and_relative_imports():
    closure = {p.relative_to(SRC).as_posix() for p in import_closure(SRC / "steps" / "distill.py")}
    # distill imports the engine inside a function, and the engine imports losses via `from . import`
    assert {"steps/distill.py", "engine.py", "losses.py", "devices.py", "checkpoints.py"} <= closure
