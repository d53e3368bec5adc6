"""`dvc exp run -S key=value` on a kdpipe stage, and `dvc metrics diff` (what `make compare` shows).

Runs the real DVC and the real `kdpipe prepare` in a throw-away git + DVC repo.
"""

import json

import pytest
from colour_data import write_images
from dvc_repo import DVC, init_repo, repo_env
from dvc_repo import run as _run

pytestmark = pytest.mark.slow  # runs a real DVC experiment

DVC_YAML = """
stages:
  prepare:
    cmd: kdpipe prepare --data-root data --out-dir out --reports-dir reports
    deps: [data]
    params: [prepare.image_size]
    outs: [out]
    metrics:
      - reports/manifest.json:
          cache: false
"""


def test_experiment_with_a_changed_param_and_metrics_diff(tmp_path):
    env = repo_env()
    write_images(tmp_path / "data", "labeled", {"blue": 4, "red": 4}, seed=0)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text("prepare:\n  image_size: 16\n")
    init_repo(tmp_path, env)
    _run([DVC, "repro", "-q"], tmp_path, env)
    _run(["git", "add", "-A"], tmp_path, env)
    _run(["git", "commit", "-qm", "baseline"], tmp_path, env)

    _run([DVC, "exp", "run", "-q", "-n", "small", "-S", "prepare.image_size=8"], tmp_path, env)
    rows = json.loads(_run([DVC, "exp", "show", "--json"], tmp_path, env))
    experiments = [exp for row in rows for exp in (row.get("experiments") or [])]
    names = {run.get("name") for exp in experiments for run in exp.get("revs", [])}
    assert "small" in names
    # The experiment ran in the workspace: the stage really used the new value.
    manifest = json.loads((tmp_path / "reports" / "manifest.json").read_text())
    assert manifest["image_size"] == 8
    diff = json.loads(_run([DVC, "metrics", "diff", "--json", "HEAD"], tmp_path, env))
    changed = diff["reports/manifest.json"]
    assert changed["image_size"] == {"old": 16, "new": 8, "diff": -8}
