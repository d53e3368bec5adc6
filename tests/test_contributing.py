"""CONTRIBUTING.md's worked examples, applied as written: each code block that starts with where it
goes (``# new file FILE``, ``# append to FILE``, ``# in FILE, after|before the line containing: TEXT``,
``# in FILE, replace the line containing: TEXT``) is applied to a copy of the package, and the result
trains (examples 1 and 2) or runs from every front end (example 3).

If the code moves and a block no longer applies (its anchor line is gone) or no longer works, these
tests fail and the guide must be updated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "CONTRIBUTING.md"
DIRECTIVE = re.compile(
    r"^# (?:new file (?P<new>\S+)|append to (?P<append>\S+)"
    r"|in (?P<file>\S+), (?P<how>after|before|replace) the line containing: (?P<anchor>.+))$"
)

pytestmark = pytest.mark.slow


def example_blocks(title: str) -> list[tuple[re.Match, str]]:
    """(directive, code) of every directed python block in the guide's section ``title``."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        lines = [line[3:] if line.startswith("   ") else line for line in block.rstrip("\n").split("\n")]
        match = DIRECTIVE.match(lines[0].strip())
        if match:
            blocks.append((match, "\n".join(lines[1:])))
    return blocks


def apply_blocks(blocks: list[tuple[re.Match, str]], src: Path) -> set[str]:
    """Apply the blocks to the package under ``src``; returns the files they touched."""
    touched = set()
    for directive, code in blocks:
        touched.add(directive["new"] or directive["append"] or directive["file"])
        if directive["new"]:
            path = src.parent / directive["new"]
            assert not path.exists(), f"{directive[0]}: the file exists already"
            path.write_text(code + "\n", encoding="utf-8")
            continue
        if directive["append"]:
            path = src.parent / directive["append"]
            path.write_text(
                path.read_text(encoding="utf-8").rstrip("\n") + "\n\n\n" + code + "\n", encoding="utf-8"
            )
            continue
        path = src.parent / directive["file"]
        lines = path.read_text(encoding="utf-8").split("\n")
        hits = [k for k, line in enumerate(lines) if directive["anchor"].strip() in line]
        assert len(hits) == 1, f"{directive[0]}: the anchor line is found {len(hits)} times in {path.name}"
        k = hits[0]
        new = code.split("\n")
        lines[k : k + 1] = {"replace": new, "after": [lines[k], *new], "before": [*new, lines[k]]}[
            directive["how"]
        ]
        path.write_text("\n".join(lines), encoding="utf-8")
    return touched


def package_copy(tmp_path: Path) -> Path:
    """src/kdpipe copied to tmp_path/src/kdpipe; returns the ``src`` folder."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "kdpipe", src / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def run_with(src: Path, script: str, *args: str, **env: str) -> str:
    """``script`` (with ``args`` as sys.argv[1:]) in a fresh interpreter that imports kdpipe from
    ``src`` (in folder ``cwd`` when given); returns its stdout."""
    cwd = env.pop("cwd", None)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(src), "KDPIPE_TRACKING": "0", **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


TRAIN = """
import json, sys
from kdpipe.core.params import validate_params
from kdpipe.steps import distill
raw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.loads(open({params!r}).read())
params = validate_params(raw)
distill.run(params, {prepared!r}, {augmented!r}, {teacher!r}, {out!r})
history = json.load(open({out!r} + "/history.json"))
print(json.dumps(sorted(k for k in history[-1] if k.startswith("loss_"))))
"""


def train_script(dirs: dict, tmp_path: Path, **train) -> str:
    raw = dirs["params"].model_dump(mode="json")
    raw["train"].update(max_iterations=4, eval_every=2, epoch_iterations=2, checkpoint_every=2, **train)
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps(raw))
    return TRAIN.format(
        params=str(params_file),
        prepared=str(dirs["prepared"]),
        augmented=str(dirs["augmented"]),
        teacher=str(dirs["teacher"]),
        out=str(tmp_path / "distill"),
    )


def test_worked_example_1_a_new_loss_term_applies_and_trains(tiny_pipeline_dirs, tmp_path):
    blocks = example_blocks("Worked example 1: a new loss term")
    assert len(blocks) == 4
    src = package_copy(tmp_path)
    assert apply_blocks(blocks, src) == {
        "src/kdpipe/training/losses.py",
        "src/kdpipe/training/recipes.py",
        "src/kdpipe/core/params.py",
    }
    # params.yaml gets the new setting from `make generate` (kdpipe params --add-missing)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    added = run_with(
        src,
        "from kdpipe.cli import main; main(['params', '--add-missing', '--params', 'params.yaml'])",
        cwd=str(tmp_path),
    )
    assert "added train.w_entropy: 0.1" in added and "1 missing settings added" in added
    check = run_with(
        src,
        "import math, torch\n"
        "from kdpipe.training import losses, recipes\n"
        "print([t.name for t in recipes.build_recipe('kd').terms])\n"
        "v = losses.unlabeled_entropy(torch.zeros(2, 2), torch.tensor([-1, 0]))\n"
        "assert math.isclose(float(v), math.log(2), rel_tol=1e-6), float(v)\n",
    )
    assert "entropy" in check
    keys = json.loads(
        run_with(src, train_script(tiny_pipeline_dirs, tmp_path, recipe="kd", w_entropy=0.5)).splitlines()[-1]
    )
    assert "loss_entropy" in keys and "loss_kd" in keys


def test_worked_example_2_a_new_recipe_applies_and_trains(tiny_pipeline_dirs, tmp_path):
    blocks = example_blocks("Worked example 2: a new recipe")
    assert len(blocks) == 2
    src = package_copy(tmp_path)
    apply_blocks(blocks, src)
    keys = json.loads(
        run_with(src, train_script(tiny_pipeline_dirs, tmp_path, recipe="kd_consistency")).splitlines()[-1]
    )
    assert {"loss_kd", "loss_cons"} <= set(keys)


def test_a_block_whose_anchor_is_gone_is_an_error(tmp_path):
    src = package_copy(tmp_path)
    stale = DIRECTIVE.match("# in src/kdpipe/core/params.py, after the line containing: class NoSuchParams:")
    with pytest.raises(AssertionError, match="found 0 times"):
        apply_blocks([(stale, "    x: int = 1")], src)


def project_copy(tmp_path: Path) -> Path:
    """The package, dvc.yaml, params.yaml and the generator scripts copied to ``tmp_path``."""
    package_copy(tmp_path)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "tests").mkdir()
    for name in ("dvc_code_deps.py", "import_graph.py"):
        shutil.copy(REPO / "tests" / name, tmp_path / "tests" / name)
    return tmp_path


CALIBRATE = """
import json, sys
import torch
from kfp.dsl import Artifact, Metrics
from kdpipe.core.params import validate_params
from kdpipe.export.onnx import export_onnx
from kdpipe.pipelines.components import step_components
from kdpipe.data.prepared import load_prepared

prepared, export_dir, out = sys.argv[1:4]
params = validate_params(json.loads(sys.argv[4]))
data = load_prepared(prepared, splits=("val",))
torch.manual_seed(0)
side = data.image_size
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, data.num_classes))
with torch.no_grad():
    model[1].weight.mul_(20.0)  # over-confident on purpose: its temperature is above 1
export_onnx(model.eval(), export_dir + "/model.onnx", side, params.export.opset)
# the Kubeflow component made from the catalog entry, run as a task runs it
component = step_components()["calibrate"]
summary = Metrics(name="summary", uri=out + ".summary", metadata={})
component.python_func(
    onnx_model=Artifact(name="onnx_model", uri=export_dir, metadata={}),
    prepared=Artifact(name="prepared", uri=prepared, metadata={}),
    evaluate_params=params.model_dump(mode="json")["evaluate"],
    calibrate=Artifact(name="calibrate", uri=out, metadata={}),
    summary=summary,
)
print(json.dumps(summary.metadata))
"""

GENERATE = """
import runpy, sys
sys.path.insert(0, sys.argv[1].rsplit("/", 1)[0])  # the generator imports its neighbour import_graph
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

COMPILE = """
import sys, yaml
from kfp import compiler
from kdpipe.core.params import load_params
from kdpipe.pipelines.kfp_pipeline import build_pipeline
compiler.Compiler().compile(build_pipeline(load_params(sys.argv[1])), package_path=sys.argv[2])
"""


def test_worked_example_3_a_new_step_runs_from_every_front_end(tiny_pipeline_dirs, tmp_path):
    blocks = example_blocks("Worked example 3: a new pipeline step")
    project = project_copy(tmp_path / "project")
    src = project / "src"
    touched = apply_blocks(blocks, src)
    assert touched == {"src/kdpipe/steps/calibrate.py", "src/kdpipe/core/catalog.py"}  # + its test

    # dvc.yaml: the stage is generated from the catalog, in pipeline order, with its code deps
    generator = project / "tests" / "dvc_code_deps.py"  # what `make dvc-deps` runs
    run_with(src, GENERATE, str(generator), "--write", "--root", str(project))
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(stages)[-3:] == ["evaluate", "calibrate", "register"]
    stage = stages["calibrate"]
    assert stage["cmd"] == "kdpipe calibrate --reports-dir reports/calibrate"
    assert {
        "artifacts/export",
        "artifacts/prepared",
        "${code}/steps/calibrate.py",
        "${code}/export/onnx.py",
    } <= set(stage["deps"])
    assert stage["params"] == ["evaluate"] and stage["outs"] == ["artifacts/calibrate"]
    assert stage["metrics"] == [{"reports/calibrate/calibration.json": {"cache": False}}]

    # the CLI command comes from the catalog entry
    help_text = run_with(src, "from kdpipe.cli import main; main(['calibrate', '--help'])")
    assert "--export-dir" in help_text and "--reports-dir" in help_text and "confidences" in help_text

    # the Kubeflow component made from the catalog entry runs the step
    export_dir, out = tmp_path / "export", tmp_path / "calibrate"
    export_dir.mkdir()
    raw = json.dumps(tiny_pipeline_dirs["params"].model_dump(mode="json"))
    printed = run_with(src, CALIBRATE, str(tiny_pipeline_dirs["prepared"]), str(export_dir), str(out), raw)
    metrics = json.loads(printed.splitlines()[-1])
    written = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert metrics == written and written["temperature"] > 1.0
    assert written["nll_after"] < written["nll_before"]

    # the compiled pipeline runs it after the quality gate, on export's ONNX model
    package = tmp_path / "pipeline.yaml"
    run_with(src, COMPILE, str(project / "params.yaml"), str(package))
    spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))  # then the platform spec
    gate = next(
        c
        for name, c in spec["components"].items()
        if name.startswith("comp-condition") and "calibrate" in c["dag"]["tasks"]
    )
    task = gate["dag"]["tasks"]["calibrate"]
    # export's output, passed into the gate's branch
    assert task["inputs"]["artifacts"]["onnx_model"] == {
        "componentInputArtifact": "pipelinechannel--export-onnx_model"
    }
    assert "register" in gate["dag"]["tasks"]
    assert "executorLabel" in spec["components"]["comp-calibrate"]
