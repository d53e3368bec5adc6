"""The ``teacher`` step: fine-tune a (pretrained) teacher on the labeled data, or adopt a given one.

With ``teacher.checkpoint`` set, the checkpoint is loaded (``weights_only=True``), checked against
the data's classes, evaluated on the validation split and copied as ``teacher.pt``; no training
happens.

Otherwise ``teacher.arch`` is built with ``teacher.weights`` (by default ImageNet EfficientNet-Lite0,
offline) and trained with the ``supervised`` recipe through the same engine as every other recipe,
with the fine-tuning settings users of pretrained networks expect:

* the new head learns at ``teacher.lr``, the pretrained backbone at ``lr * backbone_lr_scale``;
* linear warm-up over ``warmup_fraction`` of the iterations, then cosine decay;
* weight decay on weights only (never on norm scales and biases), label smoothing;
* optionally the head alone for the first ``freeze_backbone_fraction`` of the iterations, and the
  pretrained BatchNorm statistics kept (``freeze_batchnorm``), which a few labeled images per
  class would otherwise drag around.

The teacher computes at ``teacher.image_size``: it is fed prepare's teacher-resolution copy when
there is one, and otherwise upsamples the student-size images itself (on the device). Either way its
checkpoint takes the student's image size as input, like every kdpipe model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import checkpoints
from ..atomic import write_json
from ..errors import KdpipeError
from ..layout import PREPARED, TEACHER


def _adopt(params, data, out: Path, runtime) -> dict:
    from ..engine import accuracy, predict_logits

    path = params.teacher.checkpoint
    model, ckpt = checkpoints.load_model(path)
    if list(ckpt.get("class_names") or data.class_names) != data.class_names:
        raise KdpipeError(f"{path}: teacher classes {ckpt.get('class_names')} differ from the data's {data.class_names}")
    if ckpt["num_classes"] != len(data.class_names):
        raise KdpipeError(f"{path}: teacher has {ckpt['num_classes']} classes, the data {len(data.class_names)}")
    acc = accuracy(predict_logits(model.to(runtime.device), data.val_x, runtime), data.val_y)
    ckpt["meta"] = {**ckpt.get("meta", {}), "val_accuracy": acc, "role": "teacher", "source": "teacher.checkpoint",
                    "trained_in_run": False}
    ckpt["class_names"] = data.class_names
    checkpoints.save(ckpt, out / "teacher.pt")
    summary = {"trained": False, "source": str(path), "val_accuracy": acc}
    write_json(out / "metrics.json", summary)
    write_json(out / "history.json", [{"iteration": 0, "val_acc_teacher": acc}])
    return summary


def teacher_resolution(params, student_size: int) -> int:
    """The resolution the teacher computes at: ``teacher.image_size``, or the student's."""
    return int(params.teacher.image_size or student_size)


def fine_tuning_data(data):
    """The arrays the teacher trains on: prepare's teacher-resolution copy when there is one. The
    teacher sits in the student's seat of the loop, so the copy takes the student's arrays' place (and
    its views are made at the copy's resolution: :class:`kdpipe.views.OnlineViews`)."""
    from dataclasses import replace

    if data.teacher_train_x is None:
        return data
    return replace(data, train_x=data.teacher_train_x, val_x=data.teacher_val_x,
                   unlabeled_x=data.teacher_unlabeled_x, teacher_train_x=None, teacher_val_x=None,
                   teacher_unlabeled_x=None)


def build_trainer(params, data, out_dir, runtime):
    """The fine-tuning run of the teacher (the ``supervised`` recipe, the teacher in the student's seat
    of the loop, under its own report names) on ``data`` from :func:`kdpipe.steps.common.training_data`."""
    from ..augmentation import AugmentConfig
    from ..engine import LoopConfig, RunFiles, Trainer
    from ..networks import NetworkSpec
    from ..recipes import Hyper, build_recipe

    tp = params.teacher
    networks = NetworkSpec(tp.arch, tp.weights, student_input_size=teacher_resolution(params, data.image_size))
    run_files = RunFiles(out_dir, best_names={"student": "teacher.pt"},
                         report_names={"val_acc_student": "val_acc_teacher"},
                         fingerprint={"step": "teacher", "teacher": tp.model_dump(),
                                      "augment": params.augment.model_dump(), "data_version": data.data_version},
                         desc="teacher")
    return Trainer(build_recipe("supervised"), fine_tuning_data(data), LoopConfig.from_teacher(tp),
                   Hyper(label_smoothing=tp.label_smoothing), runtime, networks, run_files,
                   augment_cfg=AugmentConfig.from_params(params.augment))


def run(params, prepared_dir: str | os.PathLike = PREPARED, out_dir: str | os.PathLike = TEACHER) -> dict:
    from ..devices import runtime_from_params
    from .common import training_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = runtime_from_params(params.train)
    data = training_data(prepared_dir, teacher_copy=True)
    if params.teacher.checkpoint:
        return _adopt(params, data, out, runtime)
    tp = params.teacher
    size = teacher_resolution(params, data.image_size)
    trainer = build_trainer(params, data, out, runtime)
    summary = trainer.run()
    trainer.write_reports()
    result = {"trained": True, "arch": tp.arch, "weights": tp.weights, "image_size": size,
              "teacher_copy": data.teacher_train_x is not None,
              "val_accuracy": summary["best_student"]["accuracy"],
              "iterations": summary["iterations"], "train_seconds": summary["train_seconds"]}
    if runtime.is_main:
        write_json(out / "metrics.json", result)
        print("teacher: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return result
