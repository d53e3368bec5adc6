"""The ``distill`` step: run ``train.recipe`` (docs/methods.md) and keep the best student and teacher.

Writes into ``out_dir``: ``student.pt`` and, when the recipe trains the teacher, ``teacher.pt``
(best validation checkpoint of each network; a frozen input teacher is not an output), ``last.pt`` (the full resume state, written atomically every ``train.checkpoint_every``
iterations), ``history.json`` (one entry per evaluation), ``schedule.json`` (the adaptive
augmentation schedule, per epoch) and ``metrics.json`` (a small summary for DVC). Re-running after an interruption resumes
from ``last.pt`` if it was written with the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdpipe.core.atomic import read_json, write_json
from kdpipe.core.layout import AUGMENTED, DISTILL, PREPARED, TEACHER
from kdpipe.data.augmented import PRESENTATION_ONLY
from kdpipe.training import checkpoints


def _fingerprint(params, prepared_dir, teacher_dir) -> dict:
    """What a resume state must match: every setting and input that changes what is trained.

    Where it runs is left out (device, precision, memory layout, threads): a run preempted on one
    machine may resume on another, e.g. a GPU pod rescheduled onto another GPU type."""
    from kdpipe.core.files import file_sha256

    teacher_file = Path(teacher_dir) / "teacher.pt"
    return {
        "teacher_sha256": file_sha256(teacher_file) if teacher_file.is_file() else None,
        "step": "distill",
        "train": params.train.model_dump(exclude={"threads", "device", "amp", "channels_last"}),
        "augment": params.augment.model_dump(exclude=PRESENTATION_ONLY),
        "data_version": read_json(Path(prepared_dir) / "manifest.json")["data_version"],
    }


def _load_teacher(teacher_dir: str | os.PathLike, needed: bool):
    path = Path(teacher_dir) / "teacher.pt"
    if not needed:
        return None, None
    model, ckpt = checkpoints.load_model(path)
    return model, ckpt["arch"]


def check_cached_logits(data, augmented_dir, teacher_dir) -> None:
    """Cached teacher logits are only valid for the teacher that computed them: refuse stale ones."""
    from kdpipe.core.errors import IntegrityError
    from kdpipe.core.files import file_sha256

    if data.labeled_logits is None:
        return
    policy = read_json(Path(augmented_dir) / "policy.json")
    cached_by = (policy.get("teacher") or {}).get("sha256")
    teacher_file = Path(teacher_dir) / "teacher.pt"
    if not teacher_file.is_file() or cached_by != file_sha256(teacher_file):
        raise IntegrityError(
            f"{augmented_dir}: the stored teacher logits were computed by another teacher than "
            f"{teacher_file}; re-run `kdpipe augment` (it runs after `kdpipe teacher`)"
        )


def build_trainer(
    params,
    prepared_dir=PREPARED,
    augmented_dir=AUGMENTED,
    teacher_dir=TEACHER,
    out_dir=DISTILL,
    runtime=None,
    progress: bool = True,
    use_cached_logits: bool = True,
):
    """The configured :class:`kdpipe.training.engine.Trainer` for ``params`` (used by the step and by tests)."""
    from kdpipe.steps.common import training_data
    from kdpipe.training.augmentation import AugmentConfig
    from kdpipe.training.devices import runtime_from_params
    from kdpipe.training.engine import LoopConfig, RunFiles, Trainer
    from kdpipe.training.networks import NetworkSpec
    from kdpipe.training.recipes import Hyper, recipe_for

    tp = params.train
    recipe = recipe_for(tp)
    runtime = runtime or runtime_from_params(tp)
    stored = recipe.reads_stored_views
    # An online teacher reads prepare's teacher-resolution copy when there is one.
    data = training_data(
        prepared_dir, augmented_dir if stored else None, teacher_copy=recipe.uses_teacher and not stored
    )
    if stored and use_cached_logits:
        check_cached_logits(data, augmented_dir, teacher_dir)
    teacher, teacher_arch = _load_teacher(teacher_dir, recipe.uses_teacher)
    networks = NetworkSpec(tp.student_arch, tp.weights, teacher=teacher, teacher_arch=teacher_arch)
    run_files = RunFiles(
        out_dir,
        fingerprint=_fingerprint(params, prepared_dir, teacher_dir),
        desc=f"distill[{tp.recipe}]",
        progress=progress,
    )
    return Trainer(
        recipe,
        data,
        LoopConfig.from_train(tp, recipe),
        Hyper(tp),
        runtime,
        networks,
        run_files,
        augment_cfg=AugmentConfig.from_params(params.augment),
        use_cached_logits=use_cached_logits,
    )


def _teacher_warnings(trainer) -> list[str]:
    """A frozen teacher that its own student beats on validation has nothing left to teach: say so."""
    if trainer.teacher is None or trainer.recipe.trains_teacher or not trainer.history:
        return []
    teacher = trainer.history[-1].get("val_acc_teacher")
    student = trainer.best["student"]["accuracy"]
    if teacher is None or student is None or student <= teacher:
        return []
    return [
        f"the student ({student:.1%} on {len(trainer.data.val_y)} validation images) scores above its frozen "
        f"teacher ({teacher:.1%}): the teacher holds it back; give the teacher more pixels (teacher.image_size), "
        "more fine-tuning or another pretrained network"
    ]


def run(
    params,
    prepared_dir: str | os.PathLike = PREPARED,
    augmented_dir: str | os.PathLike = AUGMENTED,
    teacher_dir: str | os.PathLike = TEACHER,
    out_dir: str | os.PathLike = DISTILL,
) -> dict:
    trainer = build_trainer(params, prepared_dir, augmented_dir, teacher_dir, out_dir)
    summary = trainer.run()
    trainer.write_reports()
    if trainer.rt.is_main:
        metrics = {
            "recipe": summary["recipe"],
            "iterations": summary["iterations"],
            "stop_reason": summary["stop_reason"],
            "train_seconds": summary["train_seconds"],
            "val_acc_student": summary["best_student"]["accuracy"],
        }
        if "best_teacher" in summary and trainer.recipe.trains_teacher:
            metrics["val_acc_teacher"] = summary["best_teacher"]["accuracy"]
        if trainer.teacher is not None:
            metrics["teacher_in_selection"] = trainer.recipe.trains_teacher
            metrics["cached_teacher_logits"] = bool(getattr(trainer.views, "cached", False))
            metrics["teacher_online"] = trainer.recipe.teacher_online
        metrics["warnings"] = _teacher_warnings(trainer)
        write_json(Path(out_dir) / "metrics.json", metrics)
        print("distill: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "warnings"))
        for line in metrics["warnings"]:
            print(f"warning: distill: {line}")
    if trainer.rt.distributed:
        import torch.distributed as dist

        dist.barrier()
    return summary
