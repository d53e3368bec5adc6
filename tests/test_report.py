"""`kdpipe report`: DVC plots rendered to real PNG files offline, plus a one-page report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from kdpipe.orchestration.report import colour_lines_by_field, plot_specs, write_report

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = """
plots:
  - learning_curves:
      template: linear
      title: "Learning curves"
      x: iteration
      y:
        reports/distill/history.json: [val_acc_student, val_acc_teacher]
  - confusion:
      template: confusion
      x: actual
      y:
        reports/evaluate/confusion.json: predicted
"""


def test_report_renders_pngs_and_summary(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    reports = tmp_path / "reports"
    (reports / "distill").mkdir(parents=True)
    (reports / "evaluate").mkdir()
    (reports / "distill" / "history.json").write_text(
        json.dumps(
            [{"iteration": i * 10, "val_acc_student": 0.1 * i, "val_acc_teacher": 0.5} for i in range(1, 6)]
        )
    )
    (reports / "distill" / "metrics.json").write_text(json.dumps({"recipe": "full", "val_acc_student": 0.5}))
    (reports / "evaluate" / "confusion.json").write_text(
        json.dumps(
            [{"actual": a, "predicted": p} for a, p in [("cat", "cat"), ("dog", "cat"), ("dog", "dog")]]
        )
    )
    (reports / "evaluate" / "metrics.json").write_text(json.dumps({"accuracy": 0.6667}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "summary").mkdir()
    stale = tmp_path / "summary" / "schedule.png"  # an earlier run's plot that has no data this time
    stale.write_bytes(b"old picture")

    report = write_report(tmp_path, tmp_path / "summary")
    assert not stale.exists()

    for name in ("learning_curves.png", "confusion.png"):
        with Image.open(tmp_path / "summary" / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
            # a drawn chart, not a blank canvas
            assert len(np.unique(np.asarray(image.convert("L")))) > 10
    text = report.read_text()
    assert "| test accuracy (ONNX fp32) | 0.6667 |" in text and "| recipe | full |" in text
    assert "![Learning curves](learning_curves.png)" in text

    # one revision, two fields: the lines are told apart by colour, not by dash pattern alone
    spec = plot_specs(tmp_path)["learning_curves"][0]["content"]
    recoloured = colour_lines_by_field(spec)
    assert recoloured["encoding"]["color"]["field"] == "field"
    assert recoloured["encoding"]["color"]["scale"]["domain"] == ["val_acc_student", "val_acc_teacher"]
    assert spec["encoding"]["color"]["field"] == "rev"  # DVC's own spec is left alone
    with Image.open(tmp_path / "summary" / "learning_curves.png") as image:
        hsv = np.asarray(image.convert("HSV")).reshape(-1, 3).astype(int)
    vivid_hues = hsv[(hsv[:, 1] > 120) & (hsv[:, 2] > 120), 0] // 20
    assert (np.bincount(vivid_hues) > 50).sum() >= 2  # at least two line colours


def test_specs_with_several_revisions_keep_their_colours():
    spec = {
        "encoding": {
            "color": {"field": "rev", "scale": {"domain": ["HEAD", "workspace"]}},
            "strokeDash": {"field": "field", "scale": {"domain": ["a", "b"]}},
        }
    }
    assert colour_lines_by_field(spec) is spec
