"""`kdpipe report`: DVC plots rendered to real PNG files offline, plus a one-page report."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from kdpipe.report import write_report

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
    (reports / "distill" / "history.json").write_text(json.dumps(
        [{"iteration": i * 10, "val_acc_student": 0.1 * i, "val_acc_teacher": 0.5} for i in range(1, 6)]))
    (reports / "distill" / "metrics.json").write_text(json.dumps({"recipe": "full", "val_acc_student": 0.5}))
    (reports / "evaluate" / "confusion.json").write_text(json.dumps(
        [{"actual": a, "predicted": p} for a, p in [("cat", "cat"), ("dog", "cat"), ("dog", "dog")]]))
    (reports / "evaluate" / "metrics.json").write_text(json.dumps({"accuracy": 0.6667}))
    monkeypatch.chdir(tmp_path)

    report = write_report(tmp_path, tmp_path / "summary")

    for name in ("learning_curves.png", "confusion.png"):
        with Image.open(tmp_path / "summary" / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
            # a drawn chart, not a blank canvas
            assert len(set(image.convert("L").getdata())) > 10
    text = report.read_text()
    assert "| test accuracy (ONNX fp32) | 0.6667 |" in text and "| recipe | full |" in text
    assert "![Learning curves](learning_curves.png)" in text
