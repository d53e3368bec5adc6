"""Register step: log the exported ONNX model to MLflow, register a version, maybe promote it.

Inputs: ``export_dir``, ``evaluation_dir`` (the test ``accuracy``) and ``prepared_dir`` (the
promotion split). Below ``register.min_accuracy`` nothing is registered; otherwise a new version of
``register.model_name`` gets the alias ``challenger``, and :func:`decide_promotion` moves
``champion`` to it when it beats the champion on the promotion split by ``min_improvement``. Writes
``out_dir/decision.json``; as the pipeline's last step it closes the pipeline run.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import __version__
from kdpipe.core.atomic import read_json, write_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.layout import EVALUATION, EXPORTED, PREPARED, REGISTERED
from kdpipe.orchestration import tracking

CHAMPION = "champion"
CHALLENGER = "challenger"
ACCURACY_TAG = "test_accuracy"
PROMOTION_TAG = "promotion_accuracy"
CLASSES_TAG = "class_names"
# Accuracies are ratios k/n: 0.9 - 0.8 is 0.09999999999999998, which must still count as +0.1.
_TOLERANCE = 1e-9
# Checked in this order: the GPU build first, because it also provides the CPU provider.
_ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime")
_EXTERNAL_DATA_BYTES = 1 << 30


def decide_promotion(new_acc: float, champion_acc: float | None, min_improvement: float) -> tuple[bool, str]:
    """Whether the new version should become champion, and why (pure).

    Promote iff there is no champion, or ``new_acc > champion_acc`` and
    ``new_acc - champion_acc >= min_improvement`` (up to a 1e-9 tolerance for float ratios).
    """
    if champion_acc is None:
        return True, "no champion yet"
    gain = new_acc - champion_acc
    if gain <= _TOLERANCE:
        return False, f"accuracy {new_acc:.4f} does not beat the champion's {champion_acc:.4f}"
    if gain + _TOLERANCE < min_improvement:
        return False, (
            f"accuracy {new_acc:.4f} beats the champion's {champion_acc:.4f} by {gain:.4f}, "
            f"less than register.min_improvement={min_improvement}"
        )
    return True, f"accuracy {new_acc:.4f} beats the champion's {champion_acc:.4f} by {gain:.4f}"


def onnxruntime_distribution() -> tuple[str, str]:
    """(distribution name, version) of the installed onnxruntime build."""
    for name in _ORT_DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise KdpipeError("register: no onnxruntime distribution is installed (pip install onnxruntime)")


def execution_providers(distribution: str) -> list[str]:
    # onnxruntime-gpu falls back to the CPU on its own when CUDA is unusable at load time.
    if distribution == "onnxruntime-gpu":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _read_accuracy(evaluation_dir: Path) -> tuple[dict[str, Any], float]:
    path = evaluation_dir / "metrics.json"
    try:
        metrics = read_json(path)
    except OSError as exc:
        raise KdpipeError(
            f"{path}: cannot read the evaluation metrics ({exc.strerror}); run `kdpipe evaluate`"
        ) from exc
    accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not math.isfinite(accuracy):
        raise KdpipeError(f"{path}: expected a numeric top-level 'accuracy', got {accuracy!r}")
    return metrics, float(accuracy)


def _signature(model_path: Path, export_dir: Path):
    """Signature (dynamic batch) and a (1, 3, S, S) float32 input example."""
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = [d.dim_value or -1 for d in graph.input[0].type.tensor_type.shape.dim]
    size = dims[-1] if dims[-1] > 0 else int(read_json(export_dir / "preprocess.json")["image_size"])
    out_dims = [d.dim_value or -1 for d in graph.output[0].type.tensor_type.shape.dim]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), graph.input[0].name)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *out_dims[1:]), graph.output[0].name)]),
    )
    return signature, np.full((1, 3, size, size), 0.5, dtype=np.float32)


@dataclass
class PromotionSplit:
    """The images promotion is decided on: the validation split, or the test split when there is none."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    data_version: str  # of the prepared data the split comes from


def promotion_split(prepared_dir: Path) -> PromotionSplit:
    from kdpipe.data.prepared import load_prepared

    data = load_prepared(prepared_dir, splits=("val", "test"))
    if len(data.val_y):
        return PromotionSplit(
            "validation", data.val_x, data.val_y, list(data.class_names), data.manifest["data_version"]
        )
    return PromotionSplit(
        "test (there is no validation split)",
        data.test_x,
        data.test_y,
        list(data.class_names),
        data.manifest["data_version"],
    )


def onnx_accuracy(model_path: Path, split: PromotionSplit) -> float | None:
    """Top-1 accuracy of an ONNX model on the split, with onnxruntime on the CPU."""
    from kdpipe.export.onnx import CPU, accuracy, make_session, run_logits

    return accuracy(run_logits(make_session(model_path, [CPU]), np.asarray(split.images)), split.labels)


def _champion(client, name: str, split: PromotionSplit) -> tuple[Any, float | None, str | None]:
    """(champion ModelVersion or None, its accuracy on ``split`` now, why it cannot be compared)."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, None  # no registered model yet, or no champion alias
    classes = version.tags.get(CLASSES_TAG)
    if classes is not None and json.loads(classes) != split.class_names:
        old, new = json.loads(classes), split.class_names
        added = [c for c in new if c not in old]
        removed = [c for c in old if c not in new]
        return (
            version,
            None,
            (
                f"the class set changed since champion v{version.version} (added: "
                f"{', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}; order or "
                "names differ otherwise): it cannot be compared, so this version starts a new lineage"
            ),
        )
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}"))
        return version, onnx_accuracy(folder / "model.onnx", split), None
    except Exception as exc:  # a hand-set champion without a model, an unreadable file...
        return version, None, f"unreadable ({type(exc).__name__})"


def _log_model(model_path: Path, export_dir: Path, model_name: str | None):
    """Log the ONNX model with the run, and register it as a version of ``model_name`` (None: not
    registered); returns mlflow's ModelInfo."""
    import mlflow.onnx
    import onnx

    distribution, ort_version = onnxruntime_distribution()
    signature, example = _signature(model_path, export_dir)
    extra = [str(p) for p in [export_dir / "preprocess.json"] if p.is_file()]
    with _without_registry_chatter():
        return mlflow.onnx.log_model(
            onnx.load(str(model_path)),
            name="model",
            registered_model_name=model_name,
            onnx_execution_providers=execution_providers(distribution),
            pip_requirements=[f"onnx=={onnx.__version__}", f"{distribution}=={ort_version}"],
            signature=signature,
            input_example=example,
            extra_files=extra or None,
            # One self-contained model.onnx unless protobuf's 2 GB limit forces external tensor data.
            save_as_external_data=model_path.stat().st_size > _EXTERNAL_DATA_BYTES,
        )


# What MLflow prints to stderr while registering: the step's own line says the same, with the outcome.
_REGISTRY_CHATTER = ("Successfully registered model ", "Created version ", "Registered model ")


@contextlib.contextmanager
def _without_registry_chatter():
    """Pass MLflow's stderr through, less its registration notices (warnings and errors still show)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [
            line
            for line in captured.getvalue().splitlines(keepends=True)
            if not line.startswith(_REGISTRY_CHATTER)
        ]
        sys.stderr.write("".join(kept))


def _promote(
    client,
    name: str,
    version: str,
    accuracy: float,
    split: PromotionSplit,
    min_improvement: float,
    allowed: bool = True,
) -> dict[str, Any]:
    """Set ``challenger`` on the new version, move ``champion`` if it wins on the promotion split (and
    ``allowed``: an experiment never promotes); the decision fields."""
    champion, champion_acc, problem = _champion(client, name, split)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if champion is not None and problem and problem.startswith("the class set changed"):
        promoted, reason = True, problem
    elif champion is not None and champion_acc is None:
        promoted, reason = (
            False,
            (
                f"champion v{champion.version} could not be scored on the {split.name} split "
                f"({problem}); not replacing a hand-set champion automatically"
            ),
        )
    else:
        promoted, reason = decide_promotion(accuracy, champion_acc, min_improvement)
        if champion_acc is not None:
            reason += f" on the {split.name} split ({len(split.labels)} images, both scored now)"
    if promoted and not allowed:
        promoted, reason = False, f"{reason}; not promoted: register.promote is false (an experiment)"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    before = None if champion is None else {"version": str(champion.version), "accuracy": champion_acc}
    after = {"version": version, "accuracy": accuracy} if promoted else before
    return {
        "champion_before": before,
        "champion_after": after,
        "promoted": promoted,
        "reason": reason,
        "promotion_split": {"split": split.name, "images": int(len(split.labels)), "accuracy": accuracy},
    }


def _check_model(model_path: Path) -> None:
    from kdpipe.export.onnx import check_onnx

    if not model_path.is_file():
        raise KdpipeError(f"{model_path}: no exported model; run `kdpipe export`")
    check_onnx(model_path)  # onnx.load would otherwise fail with a protobuf traceback


def _register(params, export_dir: Path, accuracy: float, split: PromotionSplit) -> dict[str, Any]:
    import json

    import mlflow

    model_path = export_dir / "model.onnx"
    if not model_path.is_file():
        raise KdpipeError(f"{model_path}: no exported model; run `kdpipe export`")
    name = params.register.model_name
    promotion_accuracy = onnx_accuracy(model_path, split)
    if not params.register.new_version:  # an experiment: the model stays with its run
        _log_model(model_path, export_dir, None)
        champion, _, _ = _champion(mlflow.MlflowClient(), name, split)
        reason = "an experiment (register.new_version false): the model is logged with its MLflow run, no registry version"
        return {
            **_not_registered(name, champion, reason),
            "promotion_split": {
                "split": split.name,
                "images": int(len(split.labels)),
                "accuracy": promotion_accuracy,
            },
        }
    info = _log_model(model_path, export_dir, name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {
        ACCURACY_TAG: repr(accuracy),
        PROMOTION_TAG: repr(promotion_accuracy),
        CLASSES_TAG: json.dumps(split.class_names),
        "data_version": split.data_version,
        "git_commit": tracking.git_commit(),
        "kdpipe_version": __version__,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    mlflow.set_tag("kdpipe.registered_version", version)
    decision = {"registered": True, "model_name": name, "version": version}
    decision.update(
        _promote(
            client,
            name,
            version,
            promotion_accuracy,
            split,
            params.register.min_improvement,
            params.register.promote,
        )
    )
    return decision


def _rejected(name: str, accuracy: float, gate: float) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        champion = mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    return _not_registered(name, champion, f"accuracy {accuracy:.4f} is below register.min_accuracy={gate}")


def _not_registered(name: str, champion, reason: str) -> dict[str, Any]:
    """The decision when no version is registered: the champion, if any, stays as it was."""
    current = (
        None
        if champion is None
        else {"version": str(champion.version), "accuracy": _tag_number(champion, PROMOTION_TAG)}
    )
    return {
        "registered": False,
        "model_name": name,
        "version": None,
        "champion_before": current,
        "champion_after": current,
        "promoted": False,
        "reason": reason,
    }


def _tag_number(version, tag: str) -> float | None:
    try:
        return float(version.tags[tag])
    except (KeyError, TypeError, ValueError):
        return None


def run(
    params,
    export_dir: str | os.PathLike = EXPORTED,
    evaluation_dir: str | os.PathLike = EVALUATION,
    prepared_dir: str | os.PathLike = PREPARED,
    out_dir: str | os.PathLike = REGISTERED,
) -> dict[str, Any] | None:
    """Gate, register, promote; writes and returns the decision (``None`` on non-zero DDP ranks)."""
    if not tracking.is_main_rank():
        return None
    export_dir, evaluation_dir, out_dir = Path(export_dir), Path(evaluation_dir), Path(out_dir)
    metrics, accuracy = _read_accuracy(evaluation_dir)
    gate = params.register.min_accuracy
    if accuracy >= gate:  # a missing or malformed model fails here, before anything is read or logged
        _check_model(export_dir / "model.onnx")
    split = promotion_split(Path(prepared_dir))
    # Read before tracking.configure() moves URI credentials out of the URI MLflow keeps.
    # Credentials are masked, and the project folder is shown as "." so decision.json (kept in
    # git) names no machine-specific path.
    shown_uri = tracking.redact(tracking.tracking_uri(params)).replace(os.getcwd(), ".")
    with tracking.pipeline_run(params, run_name="kdpipe", prepared_dir=prepared_dir):
        tracking.log_params_flat(params)
        with tracking.step_run("register", params, prepared_dir=prepared_dir):
            tracking.log_metrics_flat(metrics)
            tracking.log_artifacts(
                [
                    evaluation_dir / n
                    for n in ("metrics.json", "report.md", "confusion.png", "confusion.json")
                ],
                artifact_path="evaluation",
            )
            tracking.log_artifacts(
                [
                    export_dir / n
                    for n in ("parity.json", "preprocess.json", "model.int8.onnx")
                    if (export_dir / n).exists()
                ],
                artifact_path="export",
            )
            if accuracy < gate:
                decision = _rejected(params.register.model_name, accuracy, gate)
            else:
                decision = _register(params, export_dir, accuracy, split)
            decision["accuracy"] = accuracy  # the test accuracy: reported, never compared
            decision["tracking_uri"] = shown_uri
            write_json(out_dir / "decision.json", decision)
            tracking.log_artifacts([out_dir / "decision.json"])
    tracking.close_pipeline_run()
    _print(decision)
    return decision


def _print(decision: dict[str, Any]) -> None:
    if not decision["registered"]:
        print(f"register: not registered: {decision['reason']}")
        return
    state = "promoted to champion" if decision["promoted"] else "challenger only"
    print(f"register: {decision['model_name']} v{decision['version']} {state} ({decision['reason']})")
