"""The networks of one training run: built, placed, wrapped, optimised, and run once per step.

:class:`Networks` owns what a recipe trains: the student (always), the teacher (trained when the
recipe co-trains it, frozen otherwise), the optional feature projection, their optimizers and LR
schedules, their DDP wrappers, and one forward pass per network per step (:meth:`Networks.forward`).
The training loop (:mod:`kdpipe.training.engine`) only samples, steps and records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kdpipe.core.errors import KdpipeError
from kdpipe.training.devices import Runtime
from kdpipe.training.models import build_model
from kdpipe.training.optimization import cosine_schedule, sgd
from kdpipe.training.recipes import Recipe, StepOutputs
from kdpipe.training.views import Batch


@dataclass
class NetworkSpec:
    """Which networks a run has: the student to build, and the teacher it learns from (if any)."""

    student_arch: str
    student_weights: str | None = None
    student_input_size: int | None = None  # the teacher step trains at the teacher's resolution
    # A student built beforehand (the teacher step's network with its linear-probe head), used as it is
    student_model: nn.Module | None = None
    teacher: nn.Module | None = None
    teacher_arch: str | None = None


class Networks:
    """Student, teacher and projection with their optimizers; see the module docstring."""

    def __init__(
        self, spec: NetworkSpec, recipe: Recipe, num_classes: int, image_size: int, cfg, runtime: Runtime
    ):
        self.spec, self.recipe, self.cfg, self.rt = spec, recipe, cfg, runtime
        student = spec.student_model or build_model(
            spec.student_arch,
            num_classes,
            image_size,
            spec.student_weights,
            input_size=spec.student_input_size,
        )
        self.student = student.to(runtime.device)
        self.teacher = spec.teacher.to(runtime.device) if spec.teacher is not None else None
        if recipe.uses_teacher and self.teacher is None:
            raise KdpipeError(
                f"recipe '{recipe.name}' needs a teacher: run `kdpipe teacher` first or set teacher.checkpoint"
            )
        self.projection = None
        if recipe.matches_features and self.teacher is not None:
            # learned linear map from the student's feature width to the teacher's (feature matching)
            self.projection = nn.Linear(self.student.feature_dim, self.teacher.feature_dim).to(runtime.device)
        self.student_cl = runtime.wants_channels_last(self.student)
        self.teacher_cl = self.teacher is not None and runtime.wants_channels_last(self.teacher)
        if self.student_cl:
            self.student = self.student.to(memory_format=torch.channels_last)
        if self.teacher_cl:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self._build_optimizers()
        self.student_ddp, self.teacher_ddp, self.projection_ddp = self._wrap_ddp()

    def _build_optimizers(self) -> None:
        cfg = self.cfg
        student_params = list(self.student.parameters())
        if self.projection is not None:
            student_params += list(self.projection.parameters())
        backbone = list(self.student.backbone.parameters()) if cfg.backbone_lr_scale != 1.0 else None
        self.opt_s = sgd(student_params, cfg, backbone)
        self.sched_s = cosine_schedule(self.opt_s, cfg)
        self.opt_t = self.sched_t = None
        if self.recipe.trains_teacher:
            # The teacher arrives trained (teacher step or checkpoint): co-training it at the
            # student's from-scratch LR first undoes much of that training (measured on CIFAR:
            # 59.6% -> 55.8%), so it gets a scaled-down LR.
            teacher_cfg = replace(cfg, lr=cfg.lr * cfg.teacher_lr_scale)
            self.opt_t = sgd(self.teacher.parameters(), teacher_cfg)
            self.sched_t = cosine_schedule(self.opt_t, teacher_cfg)
        elif self.teacher is not None:
            self.teacher.eval()  # frozen teacher: BN uses running statistics, no dropout
            self.teacher.requires_grad_(False)

    def _wrap_ddp(self):
        if not self.rt.distributed:
            return self.student, self.teacher, self.projection
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
        student = DDP(self.student, device_ids=ids)
        teacher = DDP(self.teacher, device_ids=ids) if self.recipe.trains_teacher else self.teacher
        # the projection is trained with the student: its gradients must be averaged too
        projection = DDP(self.projection, device_ids=ids) if self.projection is not None else None
        return student, teacher, projection

    # ------------------------------------------------------------------------------ what trains
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_s, self.opt_t) if o is not None]

    @property
    def lr_schedules(self) -> list[Any]:
        return [s for s in (self.sched_s, self.sched_t) if s is not None]

    @property
    def trained_teacher(self) -> nn.Module | None:
        """The teacher when this run trains it; a frozen teacher is an input, not a result."""
        return self.teacher if self.recipe.trains_teacher else None

    def stateful_parts(self) -> dict[str, Any]:
        """What a resume restores of the networks, by name (None where this run has no such part)."""
        return {
            "student": self.student,
            "teacher": self.trained_teacher,
            "projection": self.projection,
            "opt_s": self.opt_s,
            "opt_t": self.opt_t,
            "sched_s": self.sched_s,
            "sched_t": self.sched_t,
        }

    def set_train_modes(self, iteration: int) -> None:
        """Train mode, except what must not learn right now: a frozen backbone (head-only phase of a
        fine-tuning) and pretrained BatchNorm statistics kept by ``freeze_batchnorm`` stay in eval
        mode; a frozen backbone also stops requiring gradients, so the step skips its backward pass."""
        self.student.train()
        frozen = iteration < self.cfg.freeze_backbone_iterations
        self.student.backbone.requires_grad_(not frozen)
        if frozen:
            self.student.backbone.eval()
        elif self.cfg.freeze_batchnorm:
            for m in self.student.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if self.recipe.trains_teacher:
            self.teacher.train()

    @property
    def modes_change_during_training(self) -> bool:
        return bool(self.cfg.freeze_backbone_iterations or self.cfg.freeze_batchnorm)

    # ------------------------------------------------------------------------------ one forward
    def forward(self, batch: Batch) -> StepOutputs:
        """Each network once, on all the views it needs; the teacher's cached logits as they are."""
        n = batch.student[0].shape[0]
        want_features = self.projection is not None
        x = torch.cat(batch.student)
        if self.student_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        s_out = self.student_ddp(x, with_features=want_features) if want_features else self.student_ddp(x)
        s_logits, s_feats = s_out if want_features else (s_out, None)
        teacher_logits, t_feats = self._teacher_logits(batch, want_features)
        return StepOutputs(
            labels=batch.labels,
            student=list(s_logits.float().split(n)),
            teacher=[None if t is None else t.float() for t in teacher_logits],
            student_features=None if s_feats is None else s_feats[:n].float(),
            teacher_features=None if t_feats is None else t_feats[:n].float(),
        )

    def _teacher_logits(self, batch: Batch, want_features: bool) -> tuple[list[torch.Tensor | None], Any]:
        """The teacher's logits per view: cached ones as they are, the others from one teacher forward."""
        n = batch.student[0].shape[0]
        logits: list[torch.Tensor | None] = list(batch.teacher_logits)
        to_run = [v for v, x in enumerate(batch.teacher) if x is not None]
        t_feats = None
        if to_run:
            xt = torch.cat([batch.teacher[v] for v in to_run])
            if self.teacher_cl:
                xt = xt.contiguous(memory_format=torch.channels_last)
            with torch.set_grad_enabled(self.recipe.trains_teacher):
                t_out = (
                    self.teacher_ddp(xt, with_features=want_features)
                    if want_features
                    else self.teacher_ddp(xt)
                )
            t_logits, t_feats = t_out if want_features else (t_out, None)
            for i, v in enumerate(to_run):
                logits[v] = t_logits[i * n : (i + 1) * n]
        return logits, t_feats
