"""CONTRIBUTING.md's worked examples, applied as written: each code block that starts with where it
goes (``# append to FILE``, ``# in FILE, after the line containing: TEXT``, ``# in FILE, replace the
line containing: TEXT``) is applied to a copy of the package, and the result trains.

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

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "CONTRIBUTING.md"
DIRECTIVE = re.compile(
    r"^# (?:append to (?P<append>\S+)|in (?P<file>\S+), (?P<how>after|replace) the line containing: (?P<anchor>.+))$"
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


def apply_blocks(blocks: list[tuple[re.Match, str]], src: Path) -> None:
    for directive, code in blocks:
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
        lines[k : k + 1] = (
            [*code.split("\n")] if directive["how"] == "replace" else [lines[k], *code.split("\n")]
        )
        path.write_text("\n".join(lines), encoding="utf-8")


def package_copy(tmp_path: Path) -> Path:
    """src/kdpipe copied to tmp_path/src/kdpipe; returns the ``src`` folder."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "kdpipe", src / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return src


def run_with(src: Path, script: str, **env: str) -> str:
    """``script`` in a fresh interpreter that imports kdpipe from ``src``; returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script],
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
    apply_blocks(blocks, src)
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
