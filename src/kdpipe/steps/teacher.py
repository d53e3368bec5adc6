"""The ``teacher`` step: build the teacher the student learns from, or adopt a given one.

With ``teacher.checkpoint`` set, that checkpoint is checked, evaluated and copied as ``teacher.pt``
(select never ships it). Otherwise ``teacher.arch`` with ``teacher.weights`` is built in stages
(docs/methods.md, "The teacher"): a linear probe (the floor), fine-tuning (the probe's network is
kept when fine-tuning ends below it), Noisy Student rounds on the unlabeled images, and a check
against the student trained alone. Without a validation split the probe and the fine-tuning are
compared out of fold (:func:`cross_validate`). Every shortfall is one warning line.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import numpy as np

from kdpipe.core.atomic import write_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.layout import PREPARED, TEACHER
from kdpipe.training import checkpoints


def _adopt(params, data, out: Path, runtime) -> dict:
    from kdpipe.training.engine import accuracy, predict_logits

    path = params.teacher.checkpoint
    model, ckpt = checkpoints.load_model(path)
    if list(ckpt.get("class_names") or data.class_names) != data.class_names:
        raise KdpipeError(
            f"{path}: teacher classes {ckpt.get('class_names')} differ from the data's {data.class_names}"
        )
    if ckpt["num_classes"] != len(data.class_names):
        raise KdpipeError(
            f"{path}: teacher has {ckpt['num_classes']} classes, the data {len(data.class_names)}"
        )
    acc = accuracy(predict_logits(model.to(runtime.device), data.val_x, runtime), data.val_y)
    ckpt["meta"] = {
        **ckpt.get("meta", {}),
        "val_accuracy": acc,
        "role": "teacher",
        "source": "teacher.checkpoint",
        "trained_in_run": False,
    }
    ckpt["class_names"] = data.class_names
    checkpoints.save(ckpt, out / "teacher.pt")
    summary = {"trained": False, "source": str(path), "val_accuracy": acc}
    write_json(out / "metrics.json", summary)
    write_json(out / "history.json", [{"iteration": 0, "val_acc_teacher": acc}])
    return summary


def fine_tuning_data(data):
    """The arrays the teacher trains on: prepare's teacher-resolution copy when there is one. The
    teacher sits in the student's seat of the loop, so the copy takes the student's arrays' place (and
    its views are made at the copy's resolution: :class:`kdpipe.training.views.OnlineViews`)."""
    from dataclasses import replace

    if data.teacher_train_x is None:
        return data
    return replace(
        data,
        train_x=data.teacher_train_x,
        val_x=data.teacher_val_x,
        unlabeled_x=data.teacher_unlabeled_x,
        teacher_train_x=None,
        teacher_val_x=None,
        teacher_unlabeled_x=None,
    )


def fine_tuning_iterations(tp, labeled: int) -> int:
    """Iterations of the fine-tuning: ``teacher.epochs`` passes over the labeled training images, at
    most ``teacher.max_iterations`` (a few labels need few steps: more only memorise them)."""
    if tp.epochs is None:
        return int(tp.max_iterations)
    return max(1, min(int(tp.max_iterations), math.ceil(tp.epochs * labeled / tp.batch_size)))


def build_network(params, data):
    """The teacher network with its pretrained weights (``teacher.arch``, ``teacher.weights``),
    computing at the teacher's resolution."""
    import torch

    from kdpipe.training.models import build_model

    tp = params.teacher
    # The new classifier head is initialised here, before the training loop seeds anything: without
    # a seed of its own it came from torch's start-up seed, which torch 2.14 draws at random, so two
    # runs of the same teacher step trained two different teachers.
    torch.manual_seed(tp.seed)
    return build_model(
        tp.arch,
        len(data.class_names),
        data.image_size,
        tp.weights,
        input_size=params.teacher_image_size(data.image_size),
    )


def build_trainer(params, data, out_dir, runtime, model=None):
    """The fine-tuning run of the teacher (the ``supervised`` recipe, the teacher in the student's seat
    of the loop, under its own report names) on ``data`` from :func:`kdpipe.steps.common.training_data`;
    ``model`` is the network to start from (by default a freshly built :func:`build_network`)."""
    from kdpipe.training.engine import LoopConfig
    from kdpipe.training.recipes import build_recipe

    tp = params.teacher
    tuned = fine_tuning_data(data)
    loop = LoopConfig.from_teacher(tp, fine_tuning_iterations(tp, len(tuned.train_x)))
    return _teacher_trainer(
        params, build_recipe("supervised"), tuned, loop, runtime, data, model, out_dir, "teacher"
    )


def _teacher_trainer(params, recipe, train_data, loop, runtime, data, model, out_dir, desc, **fingerprint):
    """A training run of the teacher (fine-tuning or an unlabeled round) on ``train_data``; ``data``
    is the prepared data it came from (its image size and version)."""
    from kdpipe.training.augmentation import AugmentConfig
    from kdpipe.training.engine import Trainer
    from kdpipe.training.recipes import Hyper

    networks, run_files = _teacher_as_trained_network(params, data, model, out_dir, desc, **fingerprint)
    return Trainer(
        recipe,
        train_data,
        loop,
        Hyper(label_smoothing=params.teacher.label_smoothing),
        runtime,
        networks,
        run_files,
        augment_cfg=AugmentConfig.from_params(params.augment),
    )


def _teacher_as_trained_network(params, data, model, out_dir, desc: str, **fingerprint):
    """The networks and run files of a run that trains the teacher: the loop's trained network is
    the teacher (built from ``teacher.*``, at the teacher's image size), its best checkpoint is
    teacher.pt and its history reads ``val_acc_teacher``; ``fingerprint`` adds to what a resume
    must match (a round's index)."""
    from kdpipe.training.engine import RunFiles
    from kdpipe.training.networks import NetworkSpec

    tp = params.teacher
    networks = NetworkSpec(
        tp.arch,
        tp.weights,
        student_input_size=params.teacher_image_size(data.image_size),
        student_model=model,
    )
    run_files = RunFiles(
        out_dir,
        best_names={"student": "teacher.pt"},
        report_names={"val_acc_student": "val_acc_teacher"},
        fingerprint={
            "step": "teacher",
            **fingerprint,
            "teacher": tp.model_dump(),
            "augment": params.augment.model_dump(),
            "data_version": data.data_version,
        },
        desc=desc,
    )
    return networks, run_files


def linear_probe(params, data, model, runtime):
    """Fit a head on the teacher's frozen pretrained features (:mod:`kdpipe.training.probe`); returns the
    probe and a copy of ``model`` with that head (the probe's network). With
    ``teacher.head_from_probe`` the fine-tuning starts from that head too (LP-FT)."""
    from kdpipe.training.probe import fit_probe, install

    tp = params.teacher
    tuned = fine_tuning_data(data)
    probe = fit_probe(
        model.to(runtime.device),
        tuned.train_x,
        tuned.train_y,
        tuned.val_x,
        tuned.val_y,
        len(data.class_names),
        runtime,
        flip=params.augment.flip,
        folds=tp.probe_folds,
        seed=tp.seed,
    )
    probe_model = copy.deepcopy(model).cpu()
    install(probe_model, probe)
    if tp.head_from_probe:
        install(model, probe)
    return probe, probe_model


def _save_probe_as_teacher(model, data, probe, out: Path) -> None:
    """The probe's network (pretrained backbone untouched, fitted head) as the step's teacher.pt."""
    from kdpipe.training.models import count_parameters

    meta = {
        "val_accuracy": probe.val_accuracy,
        "iteration": 0,
        "role": "teacher",
        "recipe": "linear probe",
        "parameters": count_parameters(model),
        "trained_in_run": True,
    }
    ckpt = checkpoints.model_checkpoint(
        model, model.arch, len(data.class_names), data.image_size, data.class_names, meta
    )
    checkpoints.save(ckpt, out / "teacher.pt")


def noisy_supervised_recipe():
    """Cross-entropy on views that get the strong policy in the share ``augment.p`` (the rest weak):
    the noise of a Noisy Student round, where the teacher relearns from its own pseudo-labels."""
    from kdpipe.training.recipes import CE, Method, compose

    return compose(
        "supervised (strong views)",
        Method("supervised learning on strong views", terms=(CE,), view_plan="any"),
    )


def fast_logits(model, images: np.ndarray, runtime, opset: int = 17) -> np.ndarray:
    """Logits of the teacher for many uint8 NHWC images: through onnxruntime on a CPU device (a
    pretrained teacher runs 3.5-5x faster there than in torch eager), in torch on an accelerator."""
    import tempfile

    import torch

    from kdpipe.export.onnx import CPU, export_onnx, make_session, run_logits
    from kdpipe.training.engine import predict_logits

    if runtime.device.type != "cpu":
        return predict_logits(model, images, runtime).numpy()
    with tempfile.TemporaryDirectory(prefix="kdpipe-logits-") as tmp:
        was_training = model.training
        path = export_onnx(model.cpu().eval(), Path(tmp) / "model.onnx", int(images.shape[1]), opset)
        model.train(was_training)
        session = make_session(path, [CPU], threads=torch.get_num_threads())
        return run_logits(session, images)


def pseudo_labels(model, data, runtime, threshold: float, limit: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The unlabeled images the teacher is confident about (softmax maximum >= ``threshold``), at most
    ``limit`` of them (the most confident), with the class it gives each: ``(rows, labels, summary)``."""
    from kdpipe.export.onnx import softmax

    logits = fast_logits(model, data.unlabeled_x, runtime)
    probabilities = softmax(logits)
    confidence, labels = probabilities.max(axis=1), probabilities.argmax(axis=1)
    rows = np.flatnonzero(confidence >= threshold)
    rows = rows[np.argsort(-confidence[rows], kind="stable")][:limit]
    rows.sort()  # file order: the gather reads forward
    counts = np.bincount(labels[rows], minlength=len(data.class_names))
    summary = {
        "unlabeled": int(len(labels)),
        "pseudo_labeled": int(len(rows)),
        "threshold": threshold,
        "per_class": {name: int(n) for name, n in zip(data.class_names, counts, strict=True)},
    }
    return rows, labels[rows].astype(np.int64), summary


def unlabeled_round(params, data, model, runtime, out: Path, index: int):
    """One Noisy Student round: the current teacher labels the unlabeled images it is sure of, and
    relearns, from its own weights, on the labels plus those pseudo-labels under strong augmentation.
    Returns ``(trainer, summary)``; the round's best checkpoint is ``out/round-<index>/teacher.pt``.
    ``None`` when no unlabeled image passes the threshold."""
    from dataclasses import replace

    from kdpipe.training.engine import LoopConfig

    tp = params.teacher
    tuned = fine_tuning_data(data)
    rows, labels, summary = pseudo_labels(model, tuned, runtime, tp.pseudo_threshold, tp.pseudo_max)
    if not len(rows):
        return None, summary
    images = np.concatenate([np.asarray(tuned.train_x), np.asarray(tuned.unlabeled_x[rows])])
    round_data = replace(
        tuned,
        train_x=images,
        train_y=np.concatenate([np.asarray(tuned.train_y), labels]),
        unlabeled_x=tuned.unlabeled_x[:0],
    )
    iterations = max(
        1, min(int(tp.max_iterations), math.ceil(tp.unlabeled_epochs * len(images) / tp.batch_size))
    )
    loop = LoopConfig.from_teacher(tp, iterations)
    trainer = _teacher_trainer(
        params,
        noisy_supervised_recipe(),
        round_data,
        loop,
        runtime,
        data,
        model,
        out / f"round-{index}",
        f"teacher round {index}",
        round=index,
    )
    result = trainer.run()
    trainer.write_reports()
    summary.update(
        iterations=result["iterations"],
        train_seconds=result["train_seconds"],
        val_accuracy=result["best_student"]["accuracy"],
    )
    return trainer, summary


def student_alone(params, data, out: Path, runtime) -> dict:
    """The student network (``train.student_arch``) trained on the labels alone for
    ``teacher.student_check_iterations``: what the teacher must beat for distillation to pay."""
    from dataclasses import replace

    from kdpipe.training.augmentation import AugmentConfig
    from kdpipe.training.engine import LoopConfig, RunFiles, Trainer
    from kdpipe.training.networks import NetworkSpec
    from kdpipe.training.recipes import Hyper, build_recipe

    tp = params.train
    iterations = params.teacher.student_check_iterations
    every = min(tp.eval_every, iterations)
    loop = replace(
        LoopConfig.from_train(tp),
        max_iterations=iterations,
        eval_every=every,
        epoch_iterations=every,
        checkpoint_every=every,
        patience=0,
        target_metric=1.01,
    )
    run_files = RunFiles(
        out / "student-alone",
        fingerprint={"step": "teacher", "student_alone": tp.model_dump(), "data_version": data.data_version},
        desc="student alone",
        progress=False,
    )
    trainer = Trainer(
        build_recipe("supervised"),
        data,
        loop,
        Hyper(tp),
        runtime,
        NetworkSpec(tp.student_arch, tp.weights),
        run_files,
        augment_cfg=AugmentConfig.from_params(params.augment),
    )
    summary = trainer.run()
    return {
        "arch": tp.student_arch,
        "iterations": summary["iterations"],
        "val_accuracy": summary["best_student"]["accuracy"],
    }


def noise_margin(accuracy: float, images: int) -> float:
    """One standard error of an accuracy measured on ``images`` images (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(images, 1))


def probe_clearly_better(tuned: float, probed: float, images: int) -> bool:
    """Whether the probe leads the fine-tuned network by more than one standard error on ``images``."""
    return probed - tuned > noise_margin((tuned + probed) / 2, images)


def _floor_warnings(result: dict) -> list[str]:
    """One line per way the teacher falls short of what it must beat: its own pretrained features (a
    linear probe on them), and the student trained alone on the labels."""
    warnings = []
    tuned = result.get("fine_tuned_val_accuracy")
    probe = (result.get("probe") or {}).get("estimate")
    where = "on validation" if result.get("estimated_by") == "validation split" else "out of fold"
    if tuned is not None and probe is not None and tuned < probe:
        kept = (
            "the probe's network is kept as the teacher"
            if result.get("kept") == "linear probe"
            else "within one standard error on that many images, so the fine-tuned network is kept"
        )
        warnings.append(
            f"fine-tuning ended below a linear probe on the teacher's own pretrained features "
            f"({tuned:.1%} against {probe:.1%} {where}): {kept}; "
            "fewer teacher.epochs or a lower teacher.lr may let fine-tuning help"
        )
    alone = result.get("student_alone") or {}
    teacher = result.get("val_accuracy")
    if alone.get("val_accuracy") is not None and teacher is not None and teacher <= alone["val_accuracy"]:
        warnings.append(
            f"the teacher ({teacher:.1%} on {result.get('validation_images')} validation images) is no "
            f"better than the student trained alone on the labels ({alone['arch']}, "
            f"{alone['val_accuracy']:.1%}): distillation can only pass on what the teacher knows; give it "
            "more pixels (teacher.image_size), another pretrained network, or more labels"
        )
    return warnings


def _unlabeled_rounds(params, data, out: Path, runtime, result: dict) -> list[dict]:
    """``teacher.unlabeled_rounds`` Noisy Student rounds, each from the teacher kept so far; a round
    whose validation accuracy does not beat it is not kept (and ends the rounds)."""
    rounds = []
    for index in range(1, params.teacher.unlabeled_rounds + 1):
        model, _ = checkpoints.load_model(out / "teacher.pt")
        trainer, summary = unlabeled_round(params, data, model, runtime, out, index)
        rounds.append(summary)
        if trainer is None:
            break
        summary["kept"] = summary["val_accuracy"] > result["val_accuracy"]
        if not summary["kept"]:
            break
        if runtime.is_main:
            shutil.copyfile(out / f"round-{index}" / "teacher.pt", out / "teacher.pt")
        result.update(val_accuracy=summary["val_accuracy"], kept=f"unlabeled round {index}")
    return rounds


def _subset(data, rows, held):
    """The labeled rows ``rows`` as the training split and ``held`` as the validation split (in RAM)."""
    from dataclasses import replace

    x, y = np.asarray(data.train_x), np.asarray(data.train_y)
    big = None if data.teacher_train_x is None else np.asarray(data.teacher_train_x)
    return replace(
        data,
        train_x=x[rows],
        train_y=y[rows],
        val_x=x[held],
        val_y=y[held],
        teacher_train_x=None if big is None else big[rows],
        teacher_val_x=None if big is None else big[held],
        unlabeled_x=data.unlabeled_x[:0],
        teacher_unlabeled_x=None if data.teacher_unlabeled_x is None else data.teacher_unlabeled_x[:0],
    )


def cross_validate(params, data, runtime, out: Path) -> dict | None:
    """Without a validation split: how well the probe and the fine-tuned teacher do, out of fold.

    Each of ``teacher.folds`` folds (stratified, seeded) is held out in turn; a teacher is probed and
    fine-tuned on the other folds exactly as the final one will be on every label (a fixed schedule,
    last checkpoint), and both are scored on the held-out fold. Costs ``folds`` extra fine-tunings."""
    from kdpipe.training.engine import accuracy, predict_logits
    from kdpipe.training.probe import fold_of

    tp = params.teacher
    labels = np.asarray(data.train_y)
    folds = min(tp.folds, int(np.bincount(labels).min()) if len(labels) else 0)
    if folds < 2:
        return None
    fold = fold_of(len(labels), labels, folds, tp.seed)
    probe_right = tuned_right = 0.0
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        part = _subset(data, np.flatnonzero(fold != k), held)
        model = build_network(params, part)
        probe, _ = (
            linear_probe(params, part, model, runtime) if tp.linear_probe and tp.weights else (None, None)
        )
        if probe is not None:
            probe_right += probe.val_accuracy * len(held)
        # trained as the final teacher is: no validation split, so the fixed schedule's last checkpoint
        blind = _subset(part, np.arange(len(part.train_y)), np.arange(0))
        trainer = build_trainer(params, blind, out / f"fold-{k}", runtime, model=model)
        trainer.run_files.progress = False
        trainer.run()
        scored = fine_tuning_data(part)
        tuned_right += accuracy(predict_logits(trainer.student, scored.val_x, runtime), scored.val_y) * len(
            held
        )
    n = len(labels)
    return {
        "folds": folds,
        "probe_accuracy": probe_right / n if tp.linear_probe and tp.weights else None,
        "fine_tuned_accuracy": tuned_right / n,
    }


def _inputs_version(prepared_dir: str | os.PathLike, reads_unlabeled: bool) -> str:
    """The version of what the teacher reads (its resume fingerprint and checkpoint record): the
    version prepare writes in teacher_inputs.json for this setting, computed from its manifest."""
    from kdpipe.core.atomic import read_json
    from kdpipe.data.prepared import MANIFEST, teacher_inputs

    return teacher_inputs(read_json(Path(prepared_dir) / MANIFEST), reads_unlabeled)["version"]


def run(params, prepared_dir: str | os.PathLike = PREPARED, out_dir: str | os.PathLike = TEACHER) -> dict:
    from kdpipe.steps.common import training_data
    from kdpipe.training.devices import runtime_from_params

    out = Path(out_dir)
    runtime = runtime_from_params(params.train)
    # Only the Noisy Student rounds read the unlabeled images: without them the teacher's result does
    # not depend on them, and its DVC dependency (teacher_inputs.json) leaves them out.
    reads_unlabeled = params.teacher.unlabeled_rounds > 0
    data = training_data(prepared_dir, teacher_copy=True, unlabeled=reads_unlabeled)
    data.data_version = _inputs_version(prepared_dir, reads_unlabeled)
    if params.teacher.checkpoint:
        out.mkdir(parents=True, exist_ok=True)
        return _adopt(params, data, out, runtime)
    tp = params.teacher
    model = build_network(params, data)  # first: unusable weights stop the step before it writes anything
    out.mkdir(parents=True, exist_ok=True)
    validates = len(data.val_y) > 0
    # Without a validation split every label trains, and cross-validation says how the probe and the
    # fine-tuning do (and so which to keep); with one, the validation split does.
    cv = None if validates else cross_validate(params, data, runtime, out)
    # a probe is a floor only on pretrained features (random ones teach nothing)
    # the probe's network is kept if the fine-tuning falls below it
    probe, probe_model = (
        linear_probe(params, data, model, runtime) if tp.linear_probe and tp.weights else (None, None)
    )
    if probe is not None and runtime.is_main:
        print(
            "teacher: linear probe on the pretrained features: "
            + ", ".join(f"{k}={v}" for k, v in probe.summary().items())
        )
    trainer = build_trainer(params, data, out, runtime, model=model)
    summary = trainer.run()
    trainer.write_reports()
    tuned = summary["best_student"]["accuracy"] if validates else (cv or {}).get("fine_tuned_accuracy")
    probed = None if probe is None else probe.val_accuracy if validates else (cv or {}).get("probe_accuracy")
    result = {
        "trained": True,
        "arch": tp.arch,
        "weights": tp.weights,
        "image_size": params.teacher_image_size(data.image_size),
        "teacher_copy": data.teacher_train_x is not None,
        "validation_images": int(len(data.val_y)),
        "estimated_by": "validation split"
        if validates
        else (
            f"{cv['folds']}-fold cross-validation"
            if cv
            else "nothing (no validation split, too few labels to fold)"
        ),
        "val_accuracy": tuned,
        "fine_tuned_val_accuracy": tuned,
        "iterations": summary["iterations"],
        "train_seconds": summary["train_seconds"],
        "probe": None if probe is None else probe.summary(),
        "cross_validation": cv,
        "kept": "fine-tuned",
    }
    if result["probe"] is not None:
        result["probe"]["estimate"] = probed
    # Never below its own pretrained features: when the fine-tuned network scores clearly below the probe
    # (on validation, or out of fold), the probe's network is the teacher. "Clearly": by more than the
    # sampling noise of an accuracy on that many images, so that 3 images of 200 do not throw away a
    # fine-tuning that is as good (measured: a 1.5-point lead on 200 images cost 7 test points).
    scored = len(data.val_y) if validates else len(data.train_y)
    if probed is not None and tuned is not None and probe_clearly_better(tuned, probed, scored):
        if runtime.is_main:
            _save_probe_as_teacher(probe_model, data, probe, out)
        result.update(val_accuracy=probed, kept="linear probe")
    # An unlabeled round is kept only when validation says it helped: without a split it is not run.
    result["rounds"] = _unlabeled_rounds(params, data, out, runtime, result) if validates else []
    if tp.student_check_iterations and validates:
        result["student_alone"] = student_alone(params, data, out, runtime)
    result["warnings"] = _floor_warnings(result)
    if runtime.is_main:
        write_json(out / "metrics.json", result)
        print(
            "teacher: "
            + ", ".join(
                f"{k}={v}" for k, v in result.items() if k not in ("warnings", "probe", "cross_validation")
            )
        )
        for line in result["warnings"]:
            print(f"warning: teacher: {line}")
    return result
