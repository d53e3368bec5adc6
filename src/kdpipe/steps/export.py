"""The ``export`` step: ONNX (fp32, optional static INT8) behind a torch/onnxruntime parity gate.

``model.onnx`` is exported from the selected checkpoint; torch and onnxruntime logits on real
validation images must agree (``parity_max_abs``, ``parity_min_agreement``) or nothing is written.
With ``export.int8``, a static INT8 model calibrated on training images ships only if it agrees with
fp32 well enough (``int8_min_agreement``). Output, one folder replaced atomically: ``model.onnx``,
``model.int8.onnx``, ``parity.json``, ``preprocess.json``.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.atomic import atomic_dir, write_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.layout import EXPORTED, PREPARED, SELECTED
from kdpipe.export.onnx import FP32_NAME, INT8_NAME

QUANTIZATION = {
    "format": "QDQ",
    "per_channel": True,
    "weights": "QInt8",
    "activations": "QUInt8",
    "calibrate_method": "MinMax",
}
_CALIBRATION_BATCH = 32


def check_parity(
    torch_logits: np.ndarray, ort_logits: np.ndarray, max_abs: float, min_agreement: float
) -> dict:
    """The parity gate as a pure function: gap and top-1 agreement of two logit arrays, and ``passed``."""
    a = np.asarray(torch_logits, dtype=np.float64)
    b = np.asarray(ort_logits, dtype=np.float64)
    if a.shape != b.shape:
        return {
            "samples": int(len(a)),
            "max_abs_diff": None,
            "top1_agreement": 0.0,
            "passed": False,
            "failures": [f"logit shapes differ: {a.shape} vs {b.shape}"],
        }
    if len(a) == 0:
        raise KdpipeError("parity check needs at least one image")
    gap = float(np.abs(a - b).max())
    agreement = float((a.argmax(1) == b.argmax(1)).mean())
    failures = []
    if not gap <= max_abs:  # written this way round so that a NaN gap fails too
        failures.append(f"max abs logit difference {gap:.3g} > parity_max_abs {max_abs}")
    if agreement < min_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < parity_min_agreement {min_agreement}")
    return {
        "samples": int(len(a)),
        "max_abs_diff": gap,
        "top1_agreement": agreement,
        "passed": not failures,
        "failures": failures,
    }


def run(
    params,
    selected_dir: str | os.PathLike = SELECTED,
    prepared_dir: str | os.PathLike = PREPARED,
    out_dir: str | os.PathLike = EXPORTED,
) -> dict:
    """Export, gate, optionally quantize; write the folder described above and return ``parity.json``."""
    from kdpipe.data.prepared import load_prepared
    from kdpipe.training import checkpoints

    cfg = params.export
    data = load_prepared(prepared_dir, splits=("train", "val"))
    model_path = Path(selected_dir) / "model.pt"
    model, ckpt = checkpoints.load_model(model_path)
    _check_compatible(model_path, ckpt, data)
    images, split = parity_images(data, cfg.parity_samples)

    with atomic_dir(out_dir) as tmp:
        fp32 = _export_fp32(model, tmp / FP32_NAME, data.image_size, cfg, images)
        fp32["split"] = split
        if not fp32["passed"]:
            raise KdpipeError(
                f"{model_path}: ONNX export failed the parity gate on {fp32['samples']} {split} "
                f"images: {'; '.join(fp32['failures'])}; nothing was written to {out_dir}"
            )
        int8 = _int8(tmp, data, cfg) if cfg.int8 else {"enabled": False, "shipped": False}
        report = {
            "thresholds": {
                "parity_max_abs": cfg.parity_max_abs,
                "parity_min_agreement": cfg.parity_min_agreement,
                "int8_min_agreement": cfg.int8_min_agreement,
            },
            "opset": cfg.opset,
            "fp32": fp32,
            "int8": int8,
            "passed": True,
        }
        write_json(tmp / "parity.json", report)
        write_json(tmp / "preprocess.json", preprocess_spec(data, params))
    shipped = f", {INT8_NAME} (agreement {int8['top1_agreement']:.4f})" if int8.get("shipped") else ""
    print(f"export: {FP32_NAME} (max gap {fp32['max_abs_diff']:.2e}){shipped} -> {out_dir}")
    return report


def _check_compatible(path: Path, ckpt: dict, data) -> None:
    if int(ckpt["image_size"]) != data.image_size:
        raise KdpipeError(
            f"{path}: model was built for {ckpt['image_size']}px images, the data is {data.image_size}px"
        )
    names = ckpt.get("class_names")
    if names and list(names) != list(data.class_names):
        raise KdpipeError(f"{path}: model classes {names} differ from the prepared data's {data.class_names}")


def parity_images(data, samples: int) -> tuple[np.ndarray, str]:
    """Real images for the gate: validation first (what accuracy is judged on), else training."""
    for split in ("val", "train"):
        x = getattr(data, f"{split}_x")
        if len(x):
            return np.asarray(x[:samples]), split
    raise KdpipeError("the prepared data has no validation or training images to check the export with")


def _export_fp32(model, path: Path, image_size: int, cfg, images: np.ndarray) -> dict:
    from kdpipe.export.onnx import CPU, export_onnx, make_session, run_logits, torch_logits

    export_onnx(model, path, image_size, cfg.opset)
    session = make_session(path, [CPU])
    return check_parity(
        torch_logits(model, images), run_logits(session, images), cfg.parity_max_abs, cfg.parity_min_agreement
    )


# ---------------------------------------------------------------- INT8


def _int8(out: Path, data, cfg) -> dict[str, Any]:
    """Quantize ``out/model.onnx`` into ``out/model.int8.onnx`` and judge it against fp32."""
    calib = _calibration_images(data, cfg.calibration_samples)
    section: dict[str, Any] = {
        "enabled": True,
        "quantization": QUANTIZATION,
        "calibration_split": "train",
        "calibration_samples": int(len(calib)),
        "min_agreement": cfg.int8_min_agreement,
    }
    if len(calib) == 0:
        return {**section, "shipped": False, "reason": "no training images to calibrate on"}
    int8_path = out / INT8_NAME
    try:
        quantize_int8(out / FP32_NAME, int8_path, calib)
    except Exception as exc:  # INT8 is optional: a quantizer failure must not block the fp32 model
        warnings.warn(
            f"export: INT8 quantization failed, shipping fp32 only: {exc}", RuntimeWarning, stacklevel=2
        )
        int8_path.unlink(missing_ok=True)
        return {**section, "shipped": False, "reason": f"quantization failed: {type(exc).__name__}: {exc}"}
    section.update(compare_int8(out / FP32_NAME, int8_path, data))
    if section["top1_agreement"] < cfg.int8_min_agreement:
        int8_path.unlink()
        section.update(
            shipped=False,
            reason=(
                f"top-1 agreement with fp32 {section['top1_agreement']:.4f} < "
                f"int8_min_agreement {cfg.int8_min_agreement}"
            ),
        )
    else:
        section.update(shipped=True, reason="agreement with fp32 meets int8_min_agreement")
    return section


def _calibration_images(data, samples: int) -> np.ndarray:
    # Training images only: calibrating on validation images would flatter the INT8 comparison.
    return np.asarray(data.train_x[:samples])


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> None:
    """Static QDQ quantization (per-channel int8 weights, uint8 activations, MinMax calibration)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="kdpipe-int8-") as work:
        # Pre-processing (shape inference + graph optimisation, e.g. folding BN into conv) gives the
        # quantizer complete shapes and fewer tensors to quantize: better accuracy and speed.
        prepped = Path(work) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(prepped))
        quantize_static(
            str(prepped),
            str(int8_path),
            _calibration_reader(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _calibration_reader(images: np.ndarray):
    """A ``CalibrationDataReader`` feeding uint8 NHWC images in small batches, converted like at
    inference. Built inside a function so importing this module does not import onnxruntime."""
    from onnxruntime.quantization import CalibrationDataReader

    from kdpipe.export.onnx import INPUT_NAME, to_model_input

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self):
            if self.start >= len(images):
                return None
            chunk = images[self.start : self.start + _CALIBRATION_BATCH]
            self.start += _CALIBRATION_BATCH
            return {INPUT_NAME: to_model_input(chunk)}

        def rewind(self) -> None:
            self.start = 0

    return Reader()


def compare_int8(fp32_path: Path, int8_path: Path, data) -> dict[str, Any]:
    """Top-1 agreement with fp32 and accuracy of both on the validation split (or training images)."""
    from kdpipe.export.onnx import CPU, accuracy, make_session, run_logits

    images, split = parity_images(data, len(data.val_x) or len(data.train_x))
    labels = np.asarray(data.val_y if split == "val" else data.train_y)[: len(images)]
    fp32_logits = run_logits(make_session(fp32_path, [CPU]), images)
    int8_logits = run_logits(make_session(int8_path, [CPU]), images)
    acc_fp32, acc_int8 = accuracy(fp32_logits, labels), accuracy(int8_logits, labels)
    return {
        "compared_on": split,
        "compared_samples": int(len(images)),
        "top1_agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(fp32_logits - int8_logits).max()),
        # Accuracy on training images would be flattering; only validation accuracy is a number to compare.
        "val_accuracy_fp32": acc_fp32 if split == "val" else None,
        "val_accuracy_int8": acc_int8 if split == "val" else None,
        "accuracy_delta": (acc_int8 - acc_fp32) if split == "val" else None,
    }


# ---------------------------------------------------------------- sidecar


def jpeg_draft_size(manifest: dict[str, Any]) -> int | None:
    """The draft size prepare used (None for data prepared before draft decoding)."""
    decoding = manifest.get("decoding") or {}
    if not decoding:
        return None
    return max(int(decoding["image_size"]), int(decoding.get("teacher_size") or 0))


def preprocess_spec(data, params) -> dict[str, Any]:
    """``preprocess.json``: everything needed to feed the graph exactly like the training data."""
    from kdpipe.export.onnx import INPUT_NAME, OUTPUT_NAME

    # The decode limits prepare actually used (from its manifest), so predict rejects the same files.
    prep = {**params.prepare.model_dump(), **(data.manifest.get("params") or {})}
    return {
        "image_size": data.image_size,
        "resize": f"bicubic, whole image to image_size x image_size ({data.image_size}x{data.image_size}), "
        "no crop; kdpipe.data.imaging.resize_square",
        "decode": "kdpipe.data.imaging.decode_image: EXIF orientation applied, alpha over white, RGB",
        "decode_limits": {k: prep[k] for k in ("max_image_pixels", "min_side", "max_aspect_ratio")},
        # prepare decodes a JPEG at a reduced scale no smaller than this (libjpeg DCT scaling); predict
        # does the same so its pixels match the training data's exactly
        "jpeg_draft_size": jpeg_draft_size(data.manifest),
        "input": "float32 NCHW RGB in [0,1]",
        "normalization": "inside the graph",
        "class_names": list(data.class_names),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }
