"""``kdpipe predict``: classify image files with an exported ONNX model.

Preprocessing is the one ``prepare`` applied to the training data, read from the
``preprocess.json`` sidecar that ``export`` writes next to the model: :func:`kdpipe.data.imaging.decode_image`
(same decode limits) then :func:`kdpipe.data.imaging.resize_square` to ``image_size``, then /255 (the
normalisation is inside the graph). So a test image gives exactly the logits ``evaluate`` saw.

A file that cannot be decoded yields a row with ``error`` set instead of failing the whole run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.atomic import read_json, write_text
from kdpipe.core.errors import KdpipeError

SIDECAR = "preprocess.json"


def predict(
    model_path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    top_k: int = 3,
    batch_size: int = 64,
    provider: str = "CPUExecutionProvider",
) -> list[dict[str, Any]]:
    """One row per input image: ``{"path", "top1", "p1", ..., "error"}`` (``error`` None when fine)."""
    from kdpipe.export.onnx import make_session

    if int(batch_size) < 1:
        raise KdpipeError(f"--batch-size must be at least 1 (got {batch_size})")
    if int(top_k) < 1:
        raise KdpipeError(f"--top-k must be at least 1 (got {top_k})")
    model_path = Path(model_path)
    spec = load_spec(model_path)
    files = expand_inputs(inputs)  # before the session: a wrong folder fails fast
    session = make_session(model_path, [provider])
    names = list(spec["class_names"])
    _check_classes(model_path, session, names)
    k = min(int(top_k), len(names))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), int(batch_size)):
        rows += _predict_batch(session, files[start : start + batch_size], spec, names, k)
    return rows


def _check_classes(model_path: Path, session, names: list[str]) -> None:
    """The sidecar must name one class per model output, or every prediction would be mislabelled."""
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(names):
        raise KdpipeError(
            f"{model_path.parent / SIDECAR}: lists {len(names)} class names but {model_path} "
            f"outputs {outputs} classes; re-run the export step"
        )


def load_spec(model_path: Path) -> dict[str, Any]:
    spec_path = model_path.parent / SIDECAR
    if not model_path.is_file():
        raise KdpipeError(f"{model_path}: model not found; run `kdpipe export` or pass --model")
    if not spec_path.is_file():
        raise KdpipeError(
            f"{spec_path}: not found; predict needs the {SIDECAR} that `kdpipe export` writes "
            "next to the model (it says how to preprocess images)"
        )
    try:
        spec = read_json(spec_path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KdpipeError(f"{spec_path}: not valid JSON ({exc}); re-run the export step") from None
    if not isinstance(spec, dict):
        raise KdpipeError(f"{spec_path}: expected a JSON object; re-run the export step")
    for key in ("image_size", "class_names"):
        if key not in spec:
            raise KdpipeError(f"{spec_path}: has no '{key}' entry; re-run the export step")
    size, names = spec["image_size"], spec["class_names"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KdpipeError(
            f"{spec_path}: image_size must be a positive integer (got {size!r}); re-run the export step"
        )
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise KdpipeError(
            f"{spec_path}: class_names must be a non-empty list of names; re-run the export step"
        )
    return spec


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (any extension: decoding decides), folders searched recursively for images."""
    from kdpipe.data.imaging import IMAGE_EXTENSIONS

    inputs = list(inputs)
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            files += sorted(found)
        elif path.exists():
            files.append(path)
        else:
            raise KdpipeError(f"{path}: no such file or folder")
    if not files:
        given = ", ".join(str(i) for i in inputs)
        raise KdpipeError(
            f"{given}: no image file found (looked for {' '.join(sorted(IMAGE_EXTENSIONS))}, "
            "hidden files skipped); nothing to classify"
        )
    return files


def _decode(path: Path, spec: dict[str, Any]) -> np.ndarray:
    """Exactly prepare's pipeline: decode with its limits, then resize the whole image to a square."""
    from kdpipe.core.params import PrepareParams
    from kdpipe.data.imaging import decode_image, resize_square

    limits = {**PrepareParams().model_dump(), **(spec.get("decode_limits") or {})}
    rgb = decode_image(
        path,
        max_pixels=int(limits["max_image_pixels"]),
        min_side=int(limits["min_side"]),
        max_aspect_ratio=float(limits["max_aspect_ratio"]),
        draft_size=spec.get("jpeg_draft_size"),
    )
    return resize_square(rgb, int(spec["image_size"]))


def _predict_batch(session, files: list[Path], spec: dict, names: list[str], k: int) -> list[dict[str, Any]]:
    from kdpipe.data.imaging import RejectedImage
    from kdpipe.export.onnx import run_logits, softmax

    rows: list[dict[str, Any]] = [{"path": str(p), "error": None} for p in files]
    good, images = [], []
    for row, path in zip(rows, files, strict=True):
        try:
            images.append(_decode(path, spec))
            good.append(row)
        except RejectedImage as exc:
            row["error"] = f"{exc.reason}: {exc.detail}"
        except OSError as exc:  # unreadable file (permissions, vanished): the image is fine or unknown
            row["error"] = f"unreadable: {exc.strerror or exc}"
    if images:
        probs = softmax(run_logits(session, np.stack(images), batch=len(images)))
        for row, p in zip(good, probs, strict=True):
            order = np.argsort(-p, kind="stable")[:k]
            for rank, idx in enumerate(order, start=1):
                row[f"top{rank}"] = names[int(idx)]
                row[f"p{rank}"] = float(p[idx])
    return [_ordered(row, k) for row in rows]


def _ordered(row: dict[str, Any], k: int) -> dict[str, Any]:
    """Same keys in the same order for every row (error rows get None predictions)."""
    out: dict[str, Any] = {"path": row["path"]}
    for rank in range(1, k + 1):
        out[f"top{rank}"] = row.get(f"top{rank}")
        out[f"p{rank}"] = row.get(f"p{rank}")
    out["error"] = row["error"]
    return out


# A spreadsheet evaluates a cell that starts with one of these as a formula (=HYPERLINK(...) in a file
# name, say): OWASP's rule for CSV injection is to prefix such a cell with a single quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate, quoted so that it shows as text; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def format_predictions(rows: list[dict[str, Any]], fmt: str = "csv") -> str:
    """CSV (path, top1, p1, ..., error; empty cells for None; text cells that a spreadsheet would run
    as a formula quoted) or JSON text (exact: JSON readers run nothing)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    columns = list(rows[0]) if rows else ["path", "top1", "p1", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else spreadsheet_safe(value) for key, value in row.items()})
    return buf.getvalue()


def check_output(path: str | os.PathLike) -> None:
    if Path(path).suffix.lower() not in (".json", ".csv"):
        raise KdpipeError(f"{path}: --output must end in .csv or .json")


def write_predictions(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write rows atomically; the extension picks the format (.json, else CSV)."""
    check_output(path)
    path = Path(path)
    write_text(path, format_predictions(rows, "json" if path.suffix.lower() == ".json" else "csv"))


def summary_line(rows: list[dict[str, Any]]) -> str:
    failed = sum(1 for row in rows if row["error"])
    return f"predict: {len(rows) - failed} image(s) classified, {failed} failed"


def classified(rows: list[dict[str, Any]]) -> int:
    """How many images got a prediction (the others have an error)."""
    return sum(1 for row in rows if not row["error"])
