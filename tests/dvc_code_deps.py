"""dvc.yaml's code dependencies, derived from the import graph (pytest puts tests/ on sys.path).

Each stage ``kdpipe <step>`` depends on every module that ``kdpipe/steps/<step>.py`` imports,
directly or not, at the top or inside a function, except the modules that cannot change what a step
writes (:data:`NO_EFFECT_ON_OUTPUTS`). ``python tests/dvc_code_deps.py --write`` (``make dvc-deps``)
rewrites the ``${code}/...`` lines of every stage in dvc.yaml; tests/test_dvc_code_deps.py fails
when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from import_graph import import_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "kdpipe"
DVC_YAML = REPO / "dvc.yaml"

# Modules that cannot change what a step writes, with the reason; every other imported module is a
# dependency. core/params.py is covered by the stages' `params:` (params.yaml lists every key, tested).
NO_EFFECT_ON_OUTPUTS = {
    "core/errors.py": "error types and their messages",
    "core/progress.py": "progress bars",
    "core/atomic.py": "how a file is written (atomically), not what",
    "data/mapped.py": "which mapped pages stay resident in memory, not what is read or written",
    "core/layout.py": "default paths, which dvc.yaml's outs name themselves",
    "core/params.py": "the schema; the values are the stages' params",
}


def module_file(module: str) -> str:
    """``kdpipe.data.walk`` -> ``data/walk.py`` (``__init__.py`` for a package)."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return (
        (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(PACKAGE).as_posix()
    )


def import_closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return seen


def needed_files(step: str, graph: dict[str, set[str]] | None = None) -> list[str]:
    """The package files (relative to src/kdpipe) that stage ``kdpipe <step>`` must depend on;
    package ``__init__.py`` files hold docstrings and the version only."""
    graph = graph if graph is not None else import_graph(PACKAGE)
    files = {module_file(m) for m in import_closure(f"kdpipe.steps.{step}", graph)}
    return sorted(f for f in files if f not in NO_EFFECT_ON_OUTPUTS and not f.endswith("__init__.py"))


def stages() -> dict[str, tuple[str, set[str], str]]:
    """stage name -> (step, its ``${code}`` dependencies as files relative to src/kdpipe, code var)."""
    dvc = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))
    code = next(v["code"] for v in dvc["vars"] if "code" in v)
    found = {}
    for name, stage in dvc["stages"].items():
        deps = {d.replace("${code}/", "") for d in stage.get("deps", []) if d.startswith("${code}/")}
        found[name] = (stage["cmd"].split()[1], deps, code)
    return found


def rewrite(text: str, graph: dict[str, set[str]]) -> str:
    """dvc.yaml with each stage's ``- ${code}/...`` lines replaced by the derived list, in place of
    the first of them (the other lines and the comments are kept)."""
    steps = {name: step for name, (step, _, _) in stages().items()}
    out, stage, written = [], None, set()
    for line in text.split("\n"):
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        if line.strip().startswith("- ${code}/"):
            if stage not in written:
                indent = line[: len(line) - len(line.lstrip())]
                out += [f"{indent}- ${{code}}/{f}" for f in needed_files(steps[stage], graph)]
                written.add(stage)
            continue
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    new = rewrite(DVC_YAML.read_text(encoding="utf-8"), import_graph(PACKAGE))
    if "--write" in sys.argv:
        DVC_YAML.write_text(new, encoding="utf-8")
        print("dvc.yaml: code dependencies rewritten from the import graph")
    else:
        sys.stdout.write(new)
