"""dvc.yaml's code dependencies follow the import graph: a change to any module a step imports
(directly or not, at the top or inside a function) re-runs that step, and nothing else does.

The list is derived by tests/dvc_code_deps.py (``make dvc-deps`` writes it into dvc.yaml); these
tests fail, naming the files, when dvc.yaml drifts from the code.
"""

from __future__ import annotations

import yaml
from dvc_code_deps import PACKAGE, add_missing_stages, import_closure, needed_files, rewrite, stages
from import_graph import import_graph


def test_every_stage_depends_on_exactly_the_modules_its_step_imports():
    graph = import_graph(PACKAGE)
    drift = {}
    for name, (step, deps, _) in stages().items():
        needed = set(needed_files(step, graph))
        if needed != deps:
            drift[name] = {"missing": sorted(needed - deps), "never imported": sorted(deps - needed)}
    assert drift == {}, "dvc.yaml code dependencies drifted from the imports: run `make dvc-deps`"


def test_the_import_graph_sees_lazy_and_relative_imports():
    closure = import_closure("kdpipe.steps.distill", import_graph(PACKAGE))
    # distill imports the engine inside a function, and the engine imports its modules both ways
    assert {
        "kdpipe.training.engine",
        "kdpipe.training.losses",
        "kdpipe.training.devices",
        "kdpipe.training.checkpoints",
    } <= closure


def test_the_teacher_does_not_depend_on_the_augment_step():
    """The teacher runs before augment: a change to augment's code must not re-train the teacher."""
    assert not any(f.startswith("steps/augment") for f in needed_files("teacher"))


def test_rewrite_replaces_only_the_code_lines_of_each_stage():
    text = (
        "stages:\n  prepare:\n    cmd: kdpipe prepare\n    deps:\n      - data/labeled\n"
        "      - ${code}/gone.py\n      # a comment\n      - ${code}/also_gone.py\n    params:\n      - data\n"
    )
    graph = import_graph(PACKAGE)
    lines = rewrite(text, graph).split("\n")
    assert lines[:5] == text.split("\n")[:5] and "      # a comment" in lines and "    params:" in lines
    code = [line.strip()[len("- ${code}/") :] for line in lines if line.strip().startswith("- ${code}/")]
    assert code == needed_files("prepare", graph) and "steps/prepare.py" in code


def test_a_catalog_step_missing_from_dvc_yaml_gets_its_stage_in_pipeline_order():
    from kdpipe.core.catalog import STEPS, Step

    text = "stages:\n  prepare:\n    cmd: kdpipe prepare\n\n  register:\n    cmd: kdpipe register\n"
    calibrate = Step(
        "calibrate",
        "x",
        {"export_dir": ("artifacts/export", "?"), "out_dir": ("artifacts/calibrate", "?")},
        ("evaluate",),
        ("calibration.json", "reliability.png"),
    )
    catalog = {"prepare": STEPS["prepare"], "calibrate": calibrate, "register": STEPS["register"]}
    stages = yaml.safe_load(add_missing_stages(text, catalog))["stages"]
    assert list(stages) == ["prepare", "calibrate", "register"]
    assert stages["calibrate"] == {
        "cmd": "kdpipe calibrate --reports-dir reports/calibrate",
        "deps": ["artifacts/export", "${code}/steps/calibrate.py"],
        "params": ["evaluate"],
        "outs": ["artifacts/calibrate", {"reports/calibrate/reliability.png": {"cache": False}}],
        "metrics": [{"reports/calibrate/calibration.json": {"cache": False}}],
    }
    assert add_missing_stages(text, {"prepare": STEPS["prepare"], "register": STEPS["register"]}) == text
