"""The ``select`` step: pick the deployable model among the trained candidates, by the user's budget.

Candidates: distill's ``student.pt``, the ``teacher`` step's fine-tuned teacher and a co-trained
``teacher.pt``; each is measured (parameters, validation accuracy, batch-1 latency in onnxruntime on
one CPU thread). The most accurate within ``select.max_latency_ms`` and ``select.max_params`` wins;
a lead the validation split cannot resolve goes to the smaller model; if nothing fits the step fails
unless ``select.fallback_fastest``. Output, one folder replaced atomically: ``model.pt``,
``selection.json``, ``frontier.json``, ``frontier.png``.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.core.atomic import atomic_dir, write_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.layout import DISTILL, PREPARED, SELECTED, TEACHER

CHAMPION_NOT_CONFIGURED = "not configured (no model registry is available to the select step)"
LATENCY_THREADS = 1  # the budget is per core: one onnxruntime thread, as a server runs one model per core


def run(
    params,
    distill_dir: str | os.PathLike = DISTILL,
    teacher_dir: str | os.PathLike | None = TEACHER,
    prepared_dir: str | os.PathLike = PREPARED,
    out_dir: str | os.PathLike = SELECTED,
) -> dict:
    """Measure the candidates, choose one, write ``model.pt``, ``selection.json`` and the frontier;
    return the selection. ``teacher_dir`` None: the teacher step's model does not compete."""
    from kdpipe.data.prepared import load_prepared

    cfg = params.select
    data = load_prepared(prepared_dir, splits=("val",))
    paths, excluded = _candidate_paths(Path(distill_dir), None if teacher_dir is None else Path(teacher_dir))
    candidates = [measure(name, path, data, cfg.latency_runs, params.export.opset) for name, path in paths]
    if len(data.val_y):
        for cand in candidates:
            cand.update(score=cand["val_accuracy"], score_by="validation accuracy")
    else:  # every label trained: rank by agreement with the teacher on unlabeled images
        _score_by_teacher_agreement(candidates, teacher_dir, prepared_dir, cfg.agreement_images)
    limits = {"max_params": cfg.max_params, "max_latency_ms": cfg.max_latency_ms}
    for cand in candidates:
        cand["meets"] = _meets(cand, limits)
    chosen, reason = choose(candidates, limits, cfg.fallback_fastest)
    chosen, reason, comparisons = _prefer_smaller_on_a_statistical_tie(chosen, reason, candidates)
    for cand in candidates:
        cand.pop("_correct", None)
    reason += "".join(
        f"; {c['name']} ({c['arch']}) left out: {_violations(c, limits)}"
        for c in candidates
        if not all(c["meets"].values()) and c is not chosen
    )
    reason += "".join(f"; {e['name']} not a candidate: {e['reason']}" for e in excluded)
    selection = {
        "candidates": candidates,
        "excluded": excluded,
        "limits": limits,
        # A registry champion would need MLflow here; select stays registry-free, and says so.
        "champion": CHAMPION_NOT_CONFIGURED if cfg.include_champion else "not requested",
        "chosen": chosen["name"],
        "reason": reason,
        "comparisons": comparisons,
    }
    frontier = frontier_rows(candidates, chosen)
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(chosen["path"], tmp / "model.pt")
        write_json(tmp / "selection.json", selection)
        write_json(tmp / "frontier.json", frontier)
        plot_frontier(frontier, limits, tmp / "frontier.png")
    print(f"select: chose {chosen['name']} ({reason})")
    print(
        f"select: accuracy against latency of every candidate -> {Path(out_dir) / 'frontier.png'} "
        "(dvc plots show; make report renders it offline)"
    )
    return selection


def _score_by_teacher_agreement(candidates: list[dict], teacher_dir, prepared_dir, limit: int) -> None:
    """Without a validation split: each candidate's share of unlabeled images (at most ``limit``; the
    labeled training images when there are none) on which it gives the teacher's answer. A rule that
    needs no held-out labels: the students learned the teacher's function, so the one closest to it
    within the budget is the best estimate; the teacher scores 1 by definition."""
    from kdpipe.data.prepared import load_prepared
    from kdpipe.export.onnx import torch_logits
    from kdpipe.training import checkpoints

    reference = None if teacher_dir is None else Path(teacher_dir) / "teacher.pt"
    if reference is None or not reference.is_file():
        raise KdpipeError(
            "select: there is no validation split (prepare.val_fraction 0) and no teacher to rank the "
            f"candidates against ({reference}); run the teacher step, or keep a validation split"
        )
    data = load_prepared(prepared_dir, splits=("unlabeled", "train"))
    images = data.unlabeled_x if len(data.unlabeled_x) else data.train_x
    images = np.asarray(images[:limit])
    teacher, _ = checkpoints.load_model(reference)
    answers = torch_logits(teacher, images).argmax(axis=1)
    what = f"agreement with the teacher on {len(images)} {'unlabeled' if len(data.unlabeled_x) else 'training'} images"
    for cand in candidates:
        model, _ = checkpoints.load_model(cand["path"])
        agreement = (
            float((torch_logits(model, images).argmax(axis=1) == answers).mean()) if len(images) else None
        )
        cand.update(teacher_agreement=agreement, score=agreement, score_by=what)


def frontier_rows(candidates: list[dict], chosen: dict) -> list[dict[str, Any]]:
    """One row per candidate, as the DVC plot and the report draw them: accuracy (or, without a
    validation split, agreement with the teacher) against latency."""
    return [
        {
            "name": c["name"],
            "arch": c["arch"],
            "accuracy": c.get("score"),
            "measured_as": c.get("score_by"),
            "val_accuracy": c["val_accuracy"],
            "latency_ms": round(c["latency_ms_p50"], 4),
            "parameters": c["parameters"],
            "within_budget": all(c["meets"].values()),
            "shipped": c is chosen,
        }
        for c in candidates
    ]


def plot_frontier(rows: list[dict[str, Any]], limits: dict, path: Path) -> None:
    """Accuracy (or agreement with the teacher) against batch-1 latency, one point per candidate; the
    shipped model ringed, the latency budget a dashed line, the out-of-budget candidates grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scores = [row["accuracy"] for row in rows if row["accuracy"] is not None]
    budget = limits.get("max_latency_ms")
    for row in rows:
        accuracy = row["accuracy"] if row["accuracy"] is not None else float("nan")
        ax.scatter(
            [row["latency_ms"]],
            [accuracy],
            s=50,
            zorder=3,
            color="tab:blue" if row["within_budget"] else "tab:gray",
        )
        ax.annotate(
            f"{row['name']}\n{row['arch']}, {row['parameters'] / 1e6:.2g}M params",
            (row["latency_ms"], accuracy),
            textcoords="offset points",
            xytext=(8, -4),
            fontsize=8,
            va="top",
        )
        if row["shipped"]:
            ax.scatter(
                [row["latency_ms"]],
                [accuracy],
                s=260,
                facecolors="none",
                edgecolors="tab:red",
                linewidths=2,
                zorder=4,
                label="shipped",
            )
    if budget is not None:
        ax.axvline(
            budget, color="tab:red", linestyle="--", linewidth=1, label=f"latency budget ({budget:g} ms)"
        )
    right = max([row["latency_ms"] for row in rows] + ([budget] if budget is not None else []))
    ax.set_xlim(0, right * 1.35)
    if scores:
        ax.set_ylim(max(0.0, min(scores) - 0.08), min(1.0, max(scores) + 0.04) + 0.01)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("latency, batch 1, onnxruntime, one CPU thread (ms)")
    ax.set_ylabel((rows[0].get("measured_as") if rows else None) or "validation accuracy")
    ax.set_title("What select could ship: accuracy against latency")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")


def paired_difference(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same images, with its 95% interval (normal
    approximation of the paired differences): how sure the validation split is about the order."""
    n = len(a)
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    half = 1.96 * math.sqrt(var / n) if n > 1 else float("inf")
    # With no disagreement at all the interval would be 0: one more disagreement is the resolution.
    half = max(half, 1.0 / n)
    return {
        "validation_images": n,
        "difference": mean,
        "ci95": [mean - half, mean + half],
        "resolved": abs(mean) > half,
    }


def _prefer_smaller_on_a_statistical_tie(chosen: dict, reason: str, candidates: list[dict]):
    """Equal accuracy goes to the smaller model (docs/methods.md, "Choosing what ships"); a difference the validation split cannot
    resolve (inside its 95% interval) is treated as equal, so a few validation images never ship a
    large model for a lead that is noise."""
    comparisons = []
    fitting = [c for c in candidates if all(c["meets"].values()) and c is not chosen and c["_correct"]]
    for other in fitting:
        if not chosen["_correct"]:
            break
        cmp = {
            "a": chosen["name"],
            "b": other["name"],
            **paired_difference(chosen["_correct"], other["_correct"]),
        }
        comparisons.append(cmp)
        if not cmp["resolved"] and other["parameters"] < chosen["parameters"]:
            lo, hi = cmp["ci95"]
            reason = (
                f"{other['name']} is smaller and its validation accuracy ({_fmt_acc(other)}) is not resolvably "
                f"below {chosen['name']}'s ({_fmt_acc(chosen)}): on {cmp['validation_images']} validation images "
                f"the difference {cmp['difference']:+.3f} lies within its 95% interval [{lo:+.3f}, {hi:+.3f}]"
            )
            return other, reason, comparisons
    return chosen, reason, comparisons


def _candidate_paths(
    distill_dir: Path, teacher_dir: Path | None
) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """``([(name, path)...], [{"name", "path", "reason"}...])``: the candidates, and the files left out."""
    from kdpipe.training import checkpoints

    files = [("student", distill_dir / "student.pt"), ("cotrained_teacher", distill_dir / "teacher.pt")]
    if teacher_dir is not None:
        files.append(("teacher", teacher_dir / "teacher.pt"))
    found, excluded = [], []
    for name, path in files:
        if not path.is_file():
            continue
        meta = checkpoints.load(path).get("meta") or {}
        if name != "student" and not meta.get("trained_in_run"):
            excluded.append(
                {
                    "name": name,
                    "path": str(path),
                    "reason": "an input teacher that this pipeline did not train (teacher.checkpoint): "
                    "only models trained here compete",
                }
            )
            continue
        found.append((name, path))
    if not any(name == "student" for name, _ in found):
        raise KdpipeError(
            f"{distill_dir / 'student.pt'}: not found; run the distill step first (`kdpipe distill`)"
        )
    return found, excluded


def measure(name: str, path: Path, data, latency_runs: int, opset: int) -> dict[str, Any]:
    """Parameters, recomputed validation accuracy and onnxruntime batch-1 latency of one checkpoint."""
    from kdpipe.export.onnx import accuracy, torch_logits
    from kdpipe.training import checkpoints
    from kdpipe.training.models import count_parameters

    model, ckpt = checkpoints.load_model(path)
    _check_compatible(path, ckpt, data)
    logits = torch_logits(model, data.val_x)
    val_acc = accuracy(logits, data.val_y)
    source = "validation split (recomputed)"
    if val_acc is None:  # no validation images: the training-time number is all there is
        val_acc = (ckpt.get("meta") or {}).get("val_accuracy")
        source = "checkpoint meta (validation split is empty)"
    return {
        "name": name,
        "path": str(path),
        "arch": ckpt["arch"],
        "parameters": int(count_parameters(model)),
        "val_accuracy": val_acc,
        "val_accuracy_source": source,
        "latency_ms_p50": _latency_p50(model, ckpt["image_size"], latency_runs, opset),
        "latency_threads": LATENCY_THREADS,
        # per validation image: right or wrong (for the paired comparison; not written out)
        "_correct": [] if val_acc is None else (logits.argmax(axis=1) == data.val_y).tolist(),
    }


def _check_compatible(path: Path, ckpt: dict, data) -> None:
    names = ckpt.get("class_names")
    if names and list(names) != list(data.class_names):
        raise KdpipeError(f"{path}: model classes {names} differ from the prepared data's {data.class_names}")
    if int(ckpt["num_classes"]) != data.num_classes:
        raise KdpipeError(
            f"{path}: model has {ckpt['num_classes']} classes, the prepared data {data.num_classes}"
        )


def _latency_p50(model, image_size: int, runs: int, opset: int) -> float:
    """Batch-1 p50 in ms with onnxruntime on the CPU: what the deployment limit is about."""
    from kdpipe.export.onnx import CPU, export_onnx, latency_ms, make_session

    with tempfile.TemporaryDirectory(prefix="kdpipe-select-") as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "candidate.onnx", image_size, opset)
        session = make_session(onnx_path, [CPU], threads=LATENCY_THREADS)
        return latency_ms(session, image_size, runs, batch=1)["p50"]


def _meets(cand: dict, limits: dict) -> dict[str, bool]:
    """Per limit, whether the candidate keeps it (an unset limit always is)."""
    return {
        "max_params": limits["max_params"] is None or cand["parameters"] <= limits["max_params"],
        "max_latency_ms": limits["max_latency_ms"] is None
        or cand["latency_ms_p50"] <= limits["max_latency_ms"],
    }


def choose(candidates: list[dict], limits: dict, fallback_fastest: bool) -> tuple[dict, str]:
    """Pure selection rule on measured candidates (each with ``meets``); returns ``(chosen, reason)``."""
    fitting = [c for c in candidates if all(c["meets"].values())]
    if fitting:
        # Highest accuracy first; on equal accuracy the smaller model (cheaper to serve) wins.
        best = max(fitting, key=lambda c: (_acc(c), -c["parameters"]))
        ties = [c for c in fitting if _acc(c) == _acc(best) and c is not best]
        why = f"highest {best.get('score_by', 'validation accuracy')} ({_fmt_acc(best)}) within the limits"
        if ties:
            why += f"; tie with {', '.join(c['name'] for c in ties)} broken by fewer parameters"
        return best, why
    broken = "; ".join(f"{c['name']} ({c['arch']}): {_violations(c, limits)}" for c in candidates)
    if not fallback_fastest:
        raise KdpipeError(
            f"no candidate meets the deployment limits: {broken}. Relax select.max_params / "
            "select.max_latency_ms, or set select.fallback_fastest=true"
        )
    fastest = min(candidates, key=lambda c: (c["latency_ms_p50"], c["parameters"]))
    return (
        fastest,
        f"no candidate meets the limits ({broken}); select.fallback_fastest took the lowest latency",
    )


def _acc(cand: dict) -> float:
    """What ranks the candidates: validation accuracy, or without a validation split the agreement
    with the teacher (:func:`_score_by_teacher_agreement`)."""
    score = cand.get("score", cand["val_accuracy"])
    return float("-inf") if score is None else float(score)


def _fmt_acc(cand: dict) -> str:
    score = cand.get("score", cand["val_accuracy"])
    return "unknown" if score is None else f"{score:.4f}"


def _violations(cand: dict, limits: dict) -> str:
    parts = []
    if not cand["meets"]["max_params"]:
        parts.append(f"parameters {cand['parameters']} > max_params {limits['max_params']}")
    if not cand["meets"]["max_latency_ms"]:
        parts.append(
            f"latency p50 {cand['latency_ms_p50']:.3f} ms > max_latency_ms {limits['max_latency_ms']}"
        )
    return ", ".join(parts) or "meets both limits"
