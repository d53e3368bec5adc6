"""evaluate: test metrics, DVC confusion data, report; providers are asserted, never assumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colour_data import write_images

from kdpipe.core.errors import IntegrityError, KdpipeError
from kdpipe.core.params import Params
from kdpipe.data.prepared import load_prepared
from kdpipe.export import onnx as onnx_utils
from kdpipe.steps import evaluate, export, prepare
from kdpipe.training import checkpoints
from kdpipe.training.models import build_model


def _build(tmp: Path, test_counts: dict[str, int]) -> tuple[Path, Path]:
    """data -> prepare -> random cnn_tiny checkpoint -> export; returns (export_dir, prepared_dir)."""
    write_images(tmp / "data", "labeled", {"blue": 4, "green": 4, "red": 4}, seed=0)
    write_images(tmp / "data", "test", test_counts, seed=1)
    prepare.run(Params(), tmp / "data", tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    torch.manual_seed(0)
    model = build_model("cnn_tiny", data.num_classes, data.image_size)
    ckpt = checkpoints.model_checkpoint(
        model, "cnn_tiny", data.num_classes, data.image_size, data.class_names
    )
    checkpoints.save(ckpt, tmp / "selected" / "model.pt")
    params = Params()
    params.export.calibration_samples = 8
    export.run(params, tmp / "selected", tmp / "prepared", tmp / "export")
    return tmp / "export", tmp / "prepared"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    return _build(tmp_path_factory.mktemp("evaluate"), {"blue": 3, "green": 2, "red": 2})


def _params(**evaluate_kwargs) -> Params:
    params = Params()
    params.evaluate.latency_runs = 5
    params.evaluate.throughput_batch = 8
    for key, value in evaluate_kwargs.items():
        setattr(params.evaluate, key, value)
    return params


def test_evaluate_writes_metrics_confusion_and_report(tmp_path, exported):
    out = tmp_path / "evaluation"
    metrics = evaluate.run(_params(), *exported, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.json",
        "confusion.png",
        "metrics.json",
        "per_class.json",
        "report.md",
    ]

    written = json.loads((out / "metrics.json").read_text())
    assert written["num_test"] == 7 and 0.0 <= written["accuracy"] <= 1.0
    assert written["int8_accuracy"] is not None
    assert written["latency_ms_p50"] > 0 and written["latency_ms_p95"] >= written["latency_ms_p50"]
    assert written["throughput_ips"] > 0
    assert set(written["models"]) == {"model.onnx", "model.int8.onnx"}
    cpu = written["models"]["model.onnx"]["providers"]["CPUExecutionProvider"]
    assert cpu["active_providers"] == ["CPUExecutionProvider"] and cpu["accuracy"] == written["accuracy"]
    assert metrics["accuracy"] == written["accuracy"]

    rows = json.loads((out / "confusion.json").read_text())
    assert len(rows) == 7 and all(set(r) == {"actual", "predicted"} for r in rows)
    names = {"blue", "green", "red"}
    assert {r["actual"] for r in rows} == names and {r["predicted"] for r in rows} <= names
    assert sum(r["actual"] == r["predicted"] for r in rows) / 7 == pytest.approx(written["accuracy"])
    assert [r["actual"] for r in rows].count("blue") == 3

    per_class = json.loads((out / "per_class.json").read_text())
    assert [r["class"] for r in per_class] == ["blue", "green", "red"]
    assert sum(r["support"] for r in per_class) == 7

    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![confusion matrix](confusion.png)" in report and "model.int8.onnx" in report


def test_confusion_matrix_and_per_class_metrics():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    cm = evaluate.confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]] and cm.sum() == 5
    rows = {r["class"]: r for r in evaluate.per_class_metrics(cm, ["a", "b", "c"])}
    assert rows["b"]["precision"] == pytest.approx(2 / 3) and rows["b"]["recall"] == 1.0
    assert rows["b"]["f1"] == pytest.approx(0.8)
    assert rows["c"] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_unavailable_provider_raises_unless_cpu_fallback(exported):
    model = exported[0] / "model.onnx"
    with pytest.raises(KdpipeError, match="CUDAExecutionProvider.*not available"):
        onnx_utils.make_session(model, ["CUDAExecutionProvider"])
    with pytest.warns(RuntimeWarning, match="falling back to CPUExecutionProvider"):
        session = onnx_utils.make_session(model, ["CUDAExecutionProvider"], allow_cpu_fallback=True)
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_evaluate_with_cuda_requested_on_a_cpu_install(tmp_path, exported):
    with pytest.raises(KdpipeError, match="CUDAExecutionProvider"):
        evaluate.run(_params(providers=["CUDAExecutionProvider"]), *exported, tmp_path / "e1")
    assert not (tmp_path / "e1").exists()
    with pytest.warns(RuntimeWarning):
        metrics = evaluate.run(
            _params(providers=["CUDAExecutionProvider"], allow_cpu_fallback=True), *exported, tmp_path / "e2"
        )
    cuda = metrics["models"]["model.onnx"]["providers"]["CUDAExecutionProvider"]
    assert cuda["active_providers"] == ["CPUExecutionProvider"]


def test_tampered_prepared_data_is_refused(tmp_path, exported):
    prepared = tmp_path / "prepared"
    shutil.copytree(exported[1], prepared)
    test_x = prepared / "test_x.npy"
    raw = bytearray(test_x.read_bytes())
    raw[-1] ^= 0xFF
    test_x.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="test_x.npy"):
        evaluate.run(_params(), exported[0], prepared, tmp_path / "evaluation")


def test_empty_test_split_is_an_error(tmp_path):
    export_dir, prepared = _build(tmp_path, test_counts={})
    with pytest.raises(KdpipeError, match="test split is empty"):
        evaluate.run(_params(), export_dir, prepared, tmp_path / "evaluation")


def test_invalid_onnx_file_is_reported(tmp_path, exported):
    export_dir = tmp_path / "export"
    shutil.copytree(exported[0], export_dir)
    (export_dir / "model.int8.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(KdpipeError, match="model.int8.onnx: not a valid ONNX model"):
        evaluate.run(_params(), export_dir, exported[1], tmp_path / "evaluation")


def test_silently_dropped_provider_is_caught():
    # onnxruntime-gpu without a usable GPU keeps only the CPU provider and raises nothing: the
    # comparison of requested vs active providers is what catches it.
    requested, active = ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
    with pytest.raises(KdpipeError, match=r"dropped execution provider\(s\) \['CUDAExecutionProvider'\]"):
        onnx_utils._check_active("model.onnx", requested, active, allow_cpu_fallback=False)
    with pytest.warns(RuntimeWarning, match="dropped"):
        onnx_utils._check_active("model.onnx", requested, active, allow_cpu_fallback=True)
