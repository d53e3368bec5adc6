"""The ``select`` step: pick the deployable model among the distillation candidates.

Candidates are ``student.pt`` and ``teacher.pt`` from the distill output -- the teacher only when
this run trained it (Method C's co-training): a frozen input teacher, pretrained or from the
``teacher`` step, is a means, and shipping it unchanged is not what the user asked for. Every file
left out is listed in ``selection.json`` with the reason. For each candidate the step measures what
deployment cares about, without trusting the checkpoint's own notes:

* parameter count;
* validation accuracy, recomputed with torch on the prepared validation split;
* latency at batch 1 with onnxruntime on the CPU (exported to a temporary ONNX file, timed
  ``select.latency_runs`` times after warm-up).

The winner is the most accurate candidate within ``select.max_params`` and
``select.max_latency_ms``; equal accuracy goes to the smaller model. If nothing fits, the step
fails naming every candidate and the limits it broke, unless ``select.fallback_fastest``.

Output (one folder, replaced atomically)::

    model.pt         copy of the chosen checkpoint
    selection.json   {candidates: [...], limits, champion, chosen, reason}
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, write_json
from ..errors import KdpipeError
from ..layout import DISTILL, PREPARED, SELECTED

CANDIDATE_FILES = (("student", "student.pt"), ("teacher", "teacher.pt"))
CHAMPION_NOT_CONFIGURED = "not configured (no model registry is available to the select step)"


def run(params, distill_dir: str | os.PathLike = DISTILL, prepared_dir: str | os.PathLike = PREPARED,
        out_dir: str | os.PathLike = SELECTED) -> dict:
    """Measure the candidates, choose one, write ``model.pt`` + ``selection.json``; return the selection."""
    from ..data import load_prepared

    cfg = params.select
    data = load_prepared(prepared_dir, splits=("val",))
    paths, excluded = _candidate_paths(Path(distill_dir))
    candidates = [measure(name, path, data, cfg.latency_runs, params.export.opset) for name, path in paths]
    limits = {"max_params": cfg.max_params, "max_latency_ms": cfg.max_latency_ms}
    for cand in candidates:
        cand["meets"] = _meets(cand, limits)
    chosen, reason = choose(candidates, limits, cfg.fallback_fastest)
    chosen, reason, comparisons = _prefer_smaller_on_a_statistical_tie(chosen, reason, candidates)
    for cand in candidates:
        cand.pop("_correct", None)
    reason += "".join(f"; {c['name']} ({c['arch']}) left out: {_violations(c, limits)}"
                      for c in candidates if not all(c["meets"].values()) and c is not chosen)
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
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(chosen["path"], tmp / "model.pt")
        write_json(tmp / "selection.json", selection)
    print(f"select: chose {chosen['name']} ({reason})")
    return selection


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
    return {"validation_images": n, "difference": mean, "ci95": [mean - half, mean + half],
            "resolved": abs(mean) > half}


def _prefer_smaller_on_a_statistical_tie(chosen: dict, reason: str, candidates: list[dict]):
    """Equal accuracy goes to the smaller model (SPEC); a difference the validation split cannot
    resolve (inside its 95% interval) is treated as equal, so a few validation images never ship a
    large model for a lead that is noise."""
    comparisons = []
    fitting = [c for c in candidates if all(c["meets"].values()) and c is not chosen and c["_correct"]]
    for other in fitting:
        if not chosen["_correct"]:
            break
        cmp = {"a": chosen["name"], "b": other["name"], **paired_difference(chosen["_correct"], other["_correct"])}
        comparisons.append(cmp)
        if not cmp["resolved"] and other["parameters"] < chosen["parameters"]:
            lo, hi = cmp["ci95"]
            reason = (f"{other['name']} is smaller and its validation accuracy ({_fmt_acc(other)}) is not resolvably "
                      f"below {chosen['name']}'s ({_fmt_acc(chosen)}): on {cmp['validation_images']} validation images "
                      f"the difference {cmp['difference']:+.3f} lies within its 95% interval [{lo:+.3f}, {hi:+.3f}]")
            return other, reason, comparisons
    return chosen, reason, comparisons


def _candidate_paths(distill_dir: Path) -> tuple[list[tuple[str, Path]], list[dict[str, str]]]:
    """``([(name, path)...], [{"name", "path", "reason"}...])``: the candidates, and the files left out."""
    from .. import checkpoints

    found, excluded = [], []
    for name, file in CANDIDATE_FILES:
        path = distill_dir / file
        if not path.is_file():
            continue
        meta = checkpoints.load(path).get("meta") or {}
        if name == "teacher" and not meta.get("trained_in_run"):
            excluded.append({"name": name, "path": str(path),
                             "reason": "an input teacher that this run did not train (only a co-trained teacher "
                                       "competes with the student)"})
            continue
        found.append((name, path))
    if not any(name == "student" for name, _ in found):
        raise KdpipeError(f"{distill_dir / 'student.pt'}: not found; run the distill step first (`kdpipe distill`)")
    return found, excluded


def measure(name: str, path: Path, data, latency_runs: int, opset: int) -> dict[str, Any]:
    """Parameters, recomputed validation accuracy and onnxruntime batch-1 latency of one checkpoint."""
    from .. import checkpoints
    from ..models import count_parameters
    from ..onnx_utils import accuracy, torch_logits

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
        # per validation image: right or wrong (for the paired comparison; not written out)
        "_correct": [] if val_acc is None else (logits.argmax(axis=1) == data.val_y).tolist(),
    }


def _check_compatible(path: Path, ckpt: dict, data) -> None:
    names = ckpt.get("class_names")
    if names and list(names) != list(data.class_names):
        raise KdpipeError(f"{path}: model classes {names} differ from the prepared data's {data.class_names}")
    if int(ckpt["num_classes"]) != data.num_classes:
        raise KdpipeError(f"{path}: model has {ckpt['num_classes']} classes, the prepared data {data.num_classes}")


def _latency_p50(model, image_size: int, runs: int, opset: int) -> float:
    """Batch-1 p50 in ms with onnxruntime on the CPU: what the deployment limit is about."""
    from ..onnx_utils import CPU, export_onnx, latency_ms, make_session

    with tempfile.TemporaryDirectory(prefix="kdpipe-select-") as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "candidate.onnx", image_size, opset)
        session = make_session(onnx_path, [CPU])
        return latency_ms(session, image_size, runs, batch=1)["p50"]


def _meets(cand: dict, limits: dict) -> dict[str, bool]:
    return {
        "max_params": cand["parameters"] <= limits["max_params"],
        "max_latency_ms": cand["latency_ms_p50"] <= limits["max_latency_ms"],
    }


def choose(candidates: list[dict], limits: dict, fallback_fastest: bool) -> tuple[dict, str]:
    """Pure selection rule on measured candidates (each with ``meets``); returns ``(chosen, reason)``."""
    fitting = [c for c in candidates if all(c["meets"].values())]
    if fitting:
        # Highest accuracy first; on equal accuracy the smaller model (cheaper to serve) wins.
        best = max(fitting, key=lambda c: (_acc(c), -c["parameters"]))
        ties = [c for c in fitting if _acc(c) == _acc(best) and c is not best]
        why = f"highest validation accuracy ({_fmt_acc(best)}) within the limits"
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
    return fastest, f"no candidate meets the limits ({broken}); select.fallback_fastest took the lowest latency"


def _acc(cand: dict) -> float:
    return float("-inf") if cand["val_accuracy"] is None else float(cand["val_accuracy"])


def _fmt_acc(cand: dict) -> str:
    return "unknown" if cand["val_accuracy"] is None else f"{cand['val_accuracy']:.4f}"


def _violations(cand: dict, limits: dict) -> str:
    parts = []
    if not cand["meets"]["max_params"]:
        parts.append(f"parameters {cand['parameters']} > max_params {limits['max_params']}")
    if not cand["meets"]["max_latency_ms"]:
        parts.append(f"latency p50 {cand['latency_ms_p50']:.3f} ms > max_latency_ms {limits['max_latency_ms']}")
    return ", ".join(parts) or "meets both limits"
