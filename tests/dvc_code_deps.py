"""dvc.yaml's stages for new catalog steps, and every stage's code dependencies, derived from the
step catalog and the import graph (pytest puts tests/ on sys.path).

Each stage ``kdpipe <step>`` depends on every module that ``kdpipe/steps/<step>.py`` imports,
directly or not, at the top or inside a function, except the modules that cannot change what a step
writes (:data:`NO_EFFECT_ON_OUTPUTS`). ``python tests/dvc_code_deps.py --write`` (``make dvc-deps``)
first adds a stage for each catalog step that dvc.yaml lacks (its command, inputs, params groups,
output and reports, from the catalog: edit it afterwards if you like, tests hold it to the catalog),
then rewrites the ``${code}/...`` lines of every stage; tests/test_dvc_code_deps.py fails when they
drift. ``--root DIR`` works on another checkout (the package imported is the one on ``sys.path``).
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


def stages(text: str | None = None) -> dict[str, tuple[str, set[str], str]]:
    """stage name -> (step, its ``${code}`` dependencies as files relative to src/kdpipe, code var)."""
    dvc = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8") if text is None else text)
    code = next((v["code"] for v in dvc.get("vars", []) if "code" in v), "src/kdpipe")
    found = {}
    for name, stage in dvc["stages"].items():
        deps = {d.replace("${code}/", "") for d in stage.get("deps", []) if d.startswith("${code}/")}
        found[name] = (stage["cmd"].split()[1], deps, code)
    return found


def rewrite(text: str, graph: dict[str, set[str]]) -> str:
    """dvc.yaml with each stage's ``- ${code}/...`` lines replaced by the derived list, in place of
    the first of them (the other lines and the comments are kept)."""
    steps = {name: step for name, (step, _, _) in stages(text).items()}
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


def stage_text(step) -> list[str]:
    """dvc.yaml's stage for a catalog step: ``kdpipe <step>``, the folders it reads (the data folder
    for a step that reads it), one code line for :func:`rewrite` to expand, its params groups, its
    output folder, its JSON reports as metrics and its other reports as uncached outputs."""
    reports = [f"reports/{step.name}/{name}" for name in step.report_files]
    inputs = [default or "data" for arg, (default, _) in step.paths.items() if arg != "out_dir"]
    lines = [
        f"  {step.name}:",
        f"    cmd: kdpipe {step.name} --reports-dir reports/{step.name}",
        "    deps:",
        *(f"      - {path}" for path in inputs),
        f"      - ${{code}}/steps/{step.name}.py",
        "    params:",
        *(f"      - {group}" for group in step.param_groups),
        "    outs:",
        f"      - {step.paths['out_dir'][0]}",
        *(f"      - {r}:\n          cache: false" for r in reports if not r.endswith(".json")),
    ]
    metrics = [r for r in reports if r.endswith(".json")]
    if metrics:
        lines += ["    metrics:", *(f"      - {r}:\n          cache: false" for r in metrics)]
    return lines + [""]


def add_missing_stages(text: str, catalog: dict) -> str:
    """``text`` with a stage for each catalog step it lacks, placed before the stage of the next
    step in the catalog's order (dvc.yaml lists the stages in that order, tested)."""
    present = set(yaml.safe_load(text)["stages"])
    names = list(catalog)
    for k, name in enumerate(names):
        if name in present:
            continue
        lines = text.split("\n")
        following = next((n for n in names[k + 1 :] if n in present), None)
        at = lines.index(f"  {following}:") if following else len(lines)
        if following is None and lines[-1] == "":
            at -= 1  # before the file's final newline
        lines[at:at] = stage_text(catalog[name])
        text = "\n".join(lines)
        present.add(name)
    return text


def main(argv: list[str]) -> None:
    global PACKAGE, DVC_YAML
    from kdpipe.core.catalog import STEPS

    if "--root" in argv:
        root = Path(argv[argv.index("--root") + 1])
        PACKAGE, DVC_YAML = root / "src" / "kdpipe", root / "dvc.yaml"
    text = add_missing_stages(DVC_YAML.read_text(encoding="utf-8"), STEPS)
    new = rewrite(text, import_graph(PACKAGE))
    if "--write" in argv:
        DVC_YAML.write_text(new, encoding="utf-8")
        print("dvc.yaml: stages checked against the catalog, code dependencies rewritten from the imports")
    else:
        sys.stdout.write(new)


if __name__ == "__main__":
    main(sys.argv[1:])
