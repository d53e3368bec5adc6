"""Helpers for the benchmarks: building a prepared dir from arrays, splitting labels, scoring, tables.

Nothing here trains: training goes through kdpipe's own steps (teacher, augment, distill).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.files import file_sha256
from kdpipe.data.prepared import ARRAY_FILES, MANIFEST

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


def cpu_description() -> str:
    """E.g. "AMD EPYC, 2 cores, x86_64": results on another CPU model differ (other kernels, other
    rounding, so even seeded training ends elsewhere), so every result file records it."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


# ------------------------------------------------------------------------------------- data
def load_npz(path: str | os.PathLike) -> dict[str, Any]:
    """The arrays of a benchmark npz: uint8 NHWC images, int64 labels, class names as str."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in REQUIRED_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; need {', '.join(REQUIRED_KEYS)}")
        out = {k: z[k] for k in REQUIRED_KEYS}
    for split in ("train", "test"):
        x = out[f"x_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
            raise ValueError(f"{path}: x_{split} must be uint8 (N, S, S, 3), got {x.dtype} {x.shape}")
        out[f"y_{split}"] = out[f"y_{split}"].astype(np.int64)
    out["class_names"] = [str(c) for c in out["class_names"]]
    return out


def split_labeled(
    y: np.ndarray, fraction: float, val_fraction: float, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced labeled subset of ``round(fraction * len(y))`` images, seeded.

    Returns ``(train_idx, val_idx, unlabeled_idx)``: the N labeled images are split per class into a
    stratified validation part (``val_fraction`` of each class, at least 1) and the labeled train
    part; every other image becomes unlabeled (its label is never used).
    """
    rng = np.random.default_rng(seed)
    n_total = int(round(fraction * len(y)))
    per_class = n_total // num_classes
    train_idx, val_idx = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(
                f"class {c} has {len(idx)} images, fewer than the {per_class} per class asked for"
            )
        chosen = rng.permutation(idx)[:per_class]
        n_val = max(1, int(round(val_fraction * per_class))) if per_class > 1 else 0
        val_idx.append(chosen[:n_val])
        train_idx.append(chosen[n_val:])
    train_idx = np.sort(np.concatenate(train_idx))
    val_idx = np.sort(np.concatenate(val_idx))
    labeled = np.zeros(len(y), dtype=bool)
    labeled[train_idx] = True
    labeled[val_idx] = True
    unlabeled_idx = rng.permutation(np.flatnonzero(~labeled))
    return train_idx, val_idx, unlabeled_idx


def write_prepared(
    directory: str | os.PathLike,
    train_x,
    train_y,
    val_x,
    val_y,
    unlabeled_x,
    test_x,
    test_y,
    class_names: list[str],
) -> dict[str, Any]:
    """Write a folder that :func:`kdpipe.data.prepared.load_prepared` accepts (arrays + manifest with sha256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": train_x,
        "train_y": train_y,
        "val_x": val_x,
        "val_y": val_y,
        "unlabeled_x": unlabeled_x,
        "test_x": test_x,
        "test_y": test_y,
    }
    size = int(np.asarray(train_x).shape[1])
    files: dict[str, str] = {}
    for name in ARRAY_FILES:
        key = name[:-4]
        arr = np.ascontiguousarray(arrays[key], dtype=np.int64 if key.endswith("_y") else np.uint8)
        if key.endswith("_x") and (arr.ndim != 4 or arr.shape[1:] != (size, size, 3)):
            raise ValueError(f"{key}: expected (N, {size}, {size}, 3), got {arr.shape}")
        np.save(directory / name, arr)
        files[name] = file_sha256(directory / name)
    version = hashlib.sha256("".join(f"{n}:{files[n]}" for n in sorted(files)).encode()).hexdigest()[:16]
    manifest = {
        "class_names": list(class_names),
        "image_size": size,
        "data_version": version,
        "counts": {k[:-2]: int(len(arrays[k])) for k in arrays if k.endswith("_x")},
        "files": files,
        "source": "benchmarks.common.write_prepared",
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# ------------------------------------------------------------------------------------- scoring
def test_accuracy(
    checkpoint: str | os.PathLike, x_test: np.ndarray, y_test: np.ndarray, runtime, onnxruntime: bool = False
) -> float:
    """Test accuracy of a saved kdpipe model checkpoint, through kdpipe's own predict path (torch), or
    through its ONNX export and onnxruntime on the CPU (``onnxruntime=True``: much faster for large
    teachers; the export is checked against torch by kdpipe's export tests)."""
    from kdpipe.training import checkpoints
    from kdpipe.training.engine import accuracy, predict_logits

    model, ckpt = checkpoints.load_model(checkpoint)
    if onnxruntime and runtime.device.type == "cpu":
        import tempfile

        import torch

        from kdpipe.export.onnx import CPU, export_onnx, make_session, run_logits
        from kdpipe.export.onnx import accuracy as np_accuracy

        with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", int(ckpt["image_size"]), 17)
            session = make_session(path, [CPU], threads=torch.get_num_threads())
            return float(np_accuracy(run_logits(session, x_test), y_test))
    model = model.to(runtime.device)
    return accuracy(predict_logits(model, x_test, runtime), y_test)


def gap_closed(value: float | None, low: float | None, high: float | None) -> float | None:
    if value is None or low is None or high is None or high - low <= 1e-9:
        return None
    return (value - low) / (high - low)


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    mean = float(np.mean(vals))
    spread = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, spread


def fmt_pct(mean: float | None, spread: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}%" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def fmt_num(mean: float | None, spread: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "–"
    return f"{mean:+.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(module: str, argv: list[str] | None) -> dict[str, str]:
    """What a result file records about its run: the exact command, the CPU, the date, the code.

    ``module`` is the benchmark's module name (``benchmarks.<name>``); ``argv`` its arguments.
    """
    import shlex
    import subprocess
    import sys
    import time

    args = sys.argv[1:] if argv is None else argv
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        commit = "unknown"
    return {
        "command": shlex.join([".venv/bin/python", "-m", module, *args]),
        "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
    }


def write_results(out: str | os.PathLike, result: dict[str, Any], text: str) -> None:
    """``<out>.json`` (the raw result) and ``<out>.md`` (its report), and the report on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
