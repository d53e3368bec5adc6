"""The GitHub workflows: what reaches which step. Secrets are given per step (never to the whole
job), retraining runs on the default branch only, and its local result comes back as a pull request."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _workflow(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _secrets(value) -> set[str]:
    return set(re.findall(r"secrets\.([A-Z_]+)", str(value)))


def test_retrain_runs_on_the_default_branch_only():
    flow = _workflow("retrain.yml")
    assert flow["on"]["push"]["branches"] == ["main"]
    job = flow["jobs"]["retrain"]
    assert "github.event.repository.default_branch" in job["if"]


def test_retrain_gives_each_secret_only_to_the_steps_that_need_it():
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    # the job-level environment holds booleans only ("is it set?"), never a secret's value
    assert all(re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ != '' \}\}", v) for v in job["env"].values())
    steps = {s["name"]: s for s in job["steps"] if "name" in s}
    assert _secrets(steps["retrain"]["env"]) >= {"KFP_TOKEN", "KDPIPE_KFP_HOST", "AWS_ACCESS_KEY_ID",
                                                 "MLFLOW_TRACKING_URI"}
    assert "KDPIPE_KFP_NAMESPACE" in steps["retrain"]["env"] and "KDPIPE_IMAGE" in steps["retrain"]["env"]
    assert _secrets(steps["DVC remote from the secrets"]["env"]) == {"DVC_REMOTE_URL", "DVC_REMOTE_ENDPOINT"}
    for name, step in steps.items():
        if name not in ("retrain", "DVC remote from the secrets"):
            assert not _secrets(step), f"step {name!r} sees secrets"


def test_local_retraining_opens_a_pull_request_with_the_new_lock_file():
    job = _workflow("retrain.yml")["jobs"]["retrain"]
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    steps = {s["name"]: s for s in job["steps"] if "name" in s}
    pr = steps["pull request with the new dvc.lock and the metrics diff"]
    assert "HAS_KFP_HOST != 'true'" in pr["if"]
    assert "git add dvc.lock reports" in pr["run"] and "gh pr create" in pr["run"]
    assert "--body-file retrain-summary.md" in pr["run"]  # the metrics diff is the PR's description
    assert steps["venv cache"]["with"]["path"] == ".venv"
    assert "TORCH_CPU_INDEX" in steps["set up (venv with CPU-only torch, DVC config)"]["run"]
