"""The ``evaluate`` step: test-split quality and speed of the exported ONNX models, with onnxruntime.

The prepared data's hashes are verified and every ONNX file is checked with ``onnx.checker``; then
``model.onnx`` (and ``model.int8.onnx`` when shipped) runs on each of ``evaluate.providers`` (a
provider that is not really active is an error unless ``evaluate.allow_cpu_fallback``). Output, one
folder replaced atomically: ``metrics.json``, ``confusion.json``, ``confusion.png``,
``per_class.json``, ``report.md``.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.atomic import atomic_dir, read_json, write_json, write_text
from kdpipe.core.errors import KdpipeError
from kdpipe.core.layout import EVALUATION, EXPORTED, PREPARED
from kdpipe.export.onnx import FP32_NAME, INT8_NAME


def run(
    params,
    export_dir: str | os.PathLike = EXPORTED,
    prepared_dir: str | os.PathLike = PREPARED,
    out_dir: str | os.PathLike = EVALUATION,
) -> dict:
    """Evaluate every exported model on every configured provider; write the files above; return metrics."""
    from kdpipe.data.prepared import load_prepared
    from kdpipe.export.onnx import check_onnx

    cfg = params.evaluate
    data = load_prepared(prepared_dir, splits=("test",))
    if len(data.test_x) == 0:
        raise KdpipeError(
            f"{prepared_dir}: the test split is empty; add images under <data root>/test/<class>/ "
            "and re-run prepare"
        )
    export_dir = Path(export_dir)
    _check_classes(export_dir, data)
    models = [(name, export_dir / name) for name in (FP32_NAME, INT8_NAME) if (export_dir / name).is_file()]
    if not models or models[0][0] != FP32_NAME:
        raise KdpipeError(f"{export_dir / FP32_NAME}: not found; run the export step first (`kdpipe export`)")
    for _, path in models:
        check_onnx(path)

    labels = np.asarray(data.test_y)
    test_x = np.asarray(data.test_x)
    results = {
        name: evaluate_model(path, test_x, labels, data.num_classes, data.image_size, cfg)
        for name, path in models
    }
    primary = results[FP32_NAME]
    preds = primary.pop("predictions")
    for res in results.values():
        res.pop("predictions", None)
    cm = confusion_matrix(labels, preds, data.num_classes)
    per_class = per_class_metrics(cm, data.class_names)
    metrics = _summary(results, per_class, len(labels), cfg.providers[0])

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "confusion.json", confusion_rows(labels, preds, data.class_names))
        write_json(tmp / "per_class.json", per_class)
        plot_confusion(cm, data.class_names, tmp / "confusion.png")
        write_text(tmp / "report.md", report_markdown(metrics, per_class))
    print(
        f"evaluate: accuracy {metrics['accuracy']:.4f} on {len(labels)} test images, "
        f"p50 {metrics['latency_ms_p50']:.3f} ms -> {out_dir}"
    )
    return metrics


def _check_classes(export_dir: Path, data) -> None:
    spec_path = export_dir / "preprocess.json"
    if not spec_path.is_file():
        return  # older exports: the class count is still checked by the logits' width
    names = read_json(spec_path).get("class_names")
    if names is not None and list(names) != list(data.class_names):
        raise KdpipeError(
            f"{spec_path}: model classes {names} differ from the prepared data's {data.class_names}"
        )


def evaluate_model(
    path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int, image_size: int, cfg
) -> dict[str, Any]:
    """Accuracy, latency and throughput of one ONNX file on each provider of ``cfg.providers``."""
    from kdpipe.export.onnx import accuracy, latency_ms, make_session, run_logits, throughput

    providers: dict[str, Any] = {}
    predictions = None
    for provider in cfg.providers:
        session = make_session(path, [provider], allow_cpu_fallback=cfg.allow_cpu_fallback)
        logits = run_logits(session, images, batch=cfg.throughput_batch)
        if logits.shape[1] != num_classes:
            raise KdpipeError(
                f"{path}: the model has {logits.shape[1]} outputs, the data {num_classes} classes"
            )
        if predictions is None:
            predictions = logits.argmax(1)
        lat = latency_ms(session, image_size, cfg.latency_runs, batch=1)
        providers[provider] = {
            "active_providers": session.get_providers(),
            "accuracy": accuracy(logits, labels),
            "latency_ms": lat,
            # Fewer throughput calls than latency calls: each one is a whole batch.
            "throughput_ips": throughput(
                session, image_size, cfg.throughput_batch, max(3, cfg.latency_runs // 5)
            ),
            "throughput_batch": cfg.throughput_batch,
        }
    first = providers[cfg.providers[0]]
    return {
        "file": path.name,
        "accuracy": first["accuracy"],
        "providers": providers,
        "predictions": predictions,
    }


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[actual, predicted]`` counts."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def per_class_metrics(cm: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class; 0.0 where a ratio has no denominator."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i, name in enumerate(class_names)
    ]


def confusion_rows(labels: np.ndarray, preds: np.ndarray, class_names: list[str]) -> list[dict[str, str]]:
    """DVC's confusion template wants one row per sample, with class names (not indices)."""
    return [
        {"actual": class_names[int(a)], "predicted": class_names[int(p)]}
        for a, p in zip(labels, preds, strict=True)
    ]


def _summary(
    results: dict[str, dict], per_class: list[dict], num_test: int, first_provider: str
) -> dict[str, Any]:
    fp32 = results[FP32_NAME]["providers"][first_provider]
    supported = [row for row in per_class if row["support"] > 0]
    return {
        "accuracy": results[FP32_NAME]["accuracy"],
        "int8_accuracy": results[INT8_NAME]["accuracy"] if INT8_NAME in results else None,
        "macro_f1": float(np.mean([row["f1"] for row in supported])) if supported else None,
        "latency_ms_p50": fp32["latency_ms"]["p50"],
        "latency_ms_p95": fp32["latency_ms"]["p95"],
        "throughput_ips": fp32["throughput_ips"],
        "num_test": int(num_test),
        "primary": {"model": FP32_NAME, "provider": first_provider},
        "models": results,
    }


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    """Annotated confusion matrix PNG (Figure + Agg canvas: no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(class_names)
    side = min(16.0, 2.0 + 0.6 * n)
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"confusion matrix ({int(cm.sum())} test images)")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if cm[i, j] > threshold else "black",
                fontsize=8,
            )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(metrics: dict[str, Any], per_class: list[dict[str, Any]]) -> str:
    lines = [
        "# kdpipe evaluation",
        "",
        f"- test images: {metrics['num_test']}",
        f"- accuracy (fp32): {_fmt(metrics['accuracy'])}",
        f"- accuracy (int8): {_fmt(metrics['int8_accuracy'])}",
        f"- macro F1 (fp32): {_fmt(metrics['macro_f1'])}",
        "",
        "## Latency and throughput",
        "",
        "| model | provider | active | accuracy | p50 ms (batch 1) | p95 ms | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, res in metrics["models"].items():
        for provider, r in res["providers"].items():
            lines.append(
                f"| {name} | {provider} | {', '.join(r['active_providers'])} | {_fmt(r['accuracy'])} | "
                f"{_fmt(r['latency_ms']['p50'], 3)} | {_fmt(r['latency_ms']['p95'], 3)} | "
                f"{r['throughput_ips']:.0f} (batch {r['throughput_batch']}) |"
            )
    lines += [
        "",
        "## Per class (fp32)",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['class']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | {r['support']} |"
        for r in per_class
    ]
    lines += ["", "## Confusion matrix (fp32)", "", "![confusion matrix](confusion.png)", ""]
    return "\n".join(lines)
