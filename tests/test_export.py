"""export: fp32 ONNX behind a real torch/onnxruntime parity gate, static INT8 judged against fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from colour_data import probe_model, write_images
from onnx import numpy_helper

from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import Params
from kdpipe.data.prepared import load_prepared
from kdpipe.export import onnx as onnx_utils
from kdpipe.steps import export, prepare
from kdpipe.training import checkpoints


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> tuple[Path, Path]:
    """(selected_dir, prepared_dir) for a 3-class colour data set."""
    tmp = tmp_path_factory.mktemp("export")
    write_images(tmp / "data", "labeled", {"blue": 6, "green": 6, "red": 6}, seed=0)
    params = Params()
    params.prepare.val_fraction = 0.5
    prepare.run(params, tmp / "data", tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    model = probe_model(data)
    ckpt = checkpoints.model_checkpoint(
        model,
        "cnn_tiny",
        data.num_classes,
        data.image_size,
        data.class_names,
        {"val_accuracy": 1.0, "role": "student"},
    )
    checkpoints.save(ckpt, tmp / "selected" / "model.pt")
    return tmp / "selected", tmp / "prepared"


def _params(**export_kwargs) -> Params:
    params = Params()
    params.export.parity_samples = 16
    params.export.calibration_samples = 16
    for key, value in export_kwargs.items():
        setattr(params.export, key, value)
    return params


def test_export_writes_fp32_int8_and_sidecars(tmp_path, selected):
    out = tmp_path / "export"
    report = export.run(_params(), *selected, out)

    assert sorted(p.name for p in out.iterdir()) == [
        "model.int8.onnx",
        "model.onnx",
        "parity.json",
        "preprocess.json",
    ]
    parity = json.loads((out / "parity.json").read_text())
    assert parity == json.loads(json.dumps(report)) and parity["passed"] is True
    fp32 = parity["fp32"]
    assert fp32["passed"] and fp32["split"] == "val" and fp32["samples"] == 9
    assert fp32["max_abs_diff"] <= 1e-3 and fp32["top1_agreement"] == 1.0

    int8 = parity["int8"]
    assert int8["shipped"] is True and int8["calibration_split"] == "train"
    assert 0.0 <= int8["top1_agreement"] <= 1.0
    assert int8["accuracy_delta"] == pytest.approx(int8["val_accuracy_int8"] - int8["val_accuracy_fp32"])
    assert int8["quantization"]["format"] == "QDQ"
    # The INT8 graph really is quantized (QDQ nodes) and passes the checker.
    onnx.checker.check_model(str(out / "model.int8.onnx"))
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["image_size"] == 32 and spec["class_names"] == ["blue", "green", "red"]
    assert spec["input_name"] == "images" and spec["output_name"] == "logits"
    assert spec["input"] == "float32 NCHW RGB in [0,1]" and spec["normalization"] == "inside the graph"
    assert spec["resize"].startswith("bicubic, whole image to image_size x image_size")


def test_onnx_batch_is_dynamic(tmp_path, selected):
    out = tmp_path / "export"
    export.run(_params(int8=False), *selected, out)
    session = onnx_utils.make_session(out / "model.onnx")
    images = np.asarray(load_prepared(selected[1]).train_x)
    assert onnx_utils.run_logits(session, images, batch=5).shape == (len(images), 3)
    assert not (out / "model.int8.onnx").exists()


def test_int8_below_agreement_is_not_shipped_but_export_succeeds(tmp_path, selected, monkeypatch):
    # Calibrating on black images gives activation ranges that saturate on real ones: a bad INT8.
    monkeypatch.setattr(export, "_calibration_images", lambda data, n: np.zeros((4, 32, 32, 3), np.uint8))
    out = tmp_path / "export"
    report = export.run(_params(int8_min_agreement=0.9), *selected, out)
    int8 = report["int8"]
    assert int8["shipped"] is False and int8["top1_agreement"] < 0.9
    assert "int8_min_agreement" in int8["reason"] and int8["accuracy_delta"] < 0
    assert (out / "model.onnx").exists() and not (out / "model.int8.onnx").exists()


def _broken_export(real):
    """export_onnx that corrupts the first conv weights after exporting: the graph no longer
    computes what the torch model does."""

    def broken(model, path, image_size, opset):
        real(model, path, image_size, opset)
        proto = onnx.load(str(path))
        init = next(i for i in proto.graph.initializer if len(i.dims) == 4)
        weights = numpy_helper.to_array(init) + 0.5
        init.CopyFrom(numpy_helper.from_array(weights.astype(np.float32), init.name))
        onnx.save(proto, str(path))
        return Path(path)

    return broken


def test_parity_gate_fails_on_a_broken_export_and_writes_nothing(tmp_path, selected, monkeypatch):
    out = tmp_path / "export"
    monkeypatch.setattr(onnx_utils, "export_onnx", _broken_export(onnx_utils.export_onnx))
    with pytest.raises(KdpipeError, match="parity gate.*parity_max_abs"):
        export.run(_params(), *selected, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folder left behind either


def test_failed_gate_keeps_the_previous_export(tmp_path, selected, monkeypatch):
    out = tmp_path / "export"
    export.run(_params(int8=False), *selected, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(onnx_utils, "export_onnx", _broken_export(onnx_utils.export_onnx))
    with pytest.raises(KdpipeError):
        export.run(_params(int8=False), *selected, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_check_parity_gate():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert export.check_parity(a, a + 1e-5, 1e-3, 0.99)["passed"]
    gap = export.check_parity(a, a + 0.1, 1e-3, 0.99)
    assert not gap["passed"] and gap["top1_agreement"] == 1.0 and "parity_max_abs" in gap["failures"][0]
    flipped = a.copy()
    flipped[0] = [0.0, 1.0]
    low = export.check_parity(a, flipped, 10.0, 0.9)
    assert (
        not low["passed"] and low["top1_agreement"] == 0.75 and "parity_min_agreement" in low["failures"][0]
    )
    assert not export.check_parity(a, np.full_like(a, np.nan), 1e-3, 0.0)["passed"]
    assert not export.check_parity(a, a[:, :1], 1e-3, 0.0)["passed"]
