"""The package's layers: every import goes down the table in README's package map, and no module
imports itself back through others. Lazy imports inside functions count (tests/import_graph.py).

The checker is also run on a small package built here with one upward import and one cycle: a
layer test that passed on anything would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

from import_graph import find_cycle, import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kdpipe"
# Lowest first; a module may import its own layer and those before it. ``kdpipe`` itself holds only
# the version string, which any layer may read.
LAYERS = ("core", "data", "training", "export", "orchestration", "steps", "pipelines", "cli")
# Steps do not call each other: what two steps share lives below them, or in these two modules.
SHARED_STEP_MODULES = {"steps.catalog", "steps.common"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            short, target_short = module.partition(".")[2], target.partition(".")[2]
            if layer_of(target) > layer_of(module):
                found.append(f"{short} imports {target_short}, a layer above it")
            elif (
                short.startswith("steps.")
                and target_short.startswith("steps.")
                and target_short not in SHARED_STEP_MODULES
                and short not in SHARED_STEP_MODULES
            ):
                found.append(f"{short} imports another step, {target_short}")
    return found


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in import_graph(PACKAGE) if m != "kdpipe" and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layers of README's package map: {unknown}"


def test_imports_only_go_down_the_layers():
    assert violations(import_graph(PACKAGE)) == []


def test_no_import_cycles():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_the_checks_catch_an_upward_import_a_step_calling_a_step_and_a_cycle(tmp_path):
    pkg = tmp_path / "kdpipe"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from kdpipe.training import b  # lazy, still counted\n",
        "training/__init__.py": "",
        "training/b.py": "from kdpipe.core import a\n",
        "steps/__init__.py": "",
        "steps/one.py": "from . import two\n",
        "steps/two.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert violations(graph) == [
        "core.a imports training.b, a layer above it",
        "steps.one imports another step, steps.two",
    ]
    assert find_cycle(graph) == ["kdpipe.core.a", "kdpipe.training.b", "kdpipe.core.a"]
