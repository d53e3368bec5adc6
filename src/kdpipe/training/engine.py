"""The training loop shared by every recipe and by the teacher step.

One loop, many recipes: a :class:`kdpipe.training.recipes.Recipe` says which views to build and which loss
terms to sum, :class:`kdpipe.training.networks.Networks` runs and optimises the networks it trains, and this
module samples batches, steps, evaluates, keeps the best checkpoint of each trained network, stops
early, writes the history, and checkpoints everything needed to resume bit-for-bit. What a resume
restores is listed once, in :meth:`Trainer._stateful_parts` and :attr:`Trainer.RESUMED_VALUES`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.core.atomic import write_json
from kdpipe.core.errors import KdpipeError
from kdpipe.core.progress import Progress
from kdpipe.data.mapped import release
from kdpipe.data.prefetch import BatchStream
from kdpipe.data.samplers import LabeledUnlabeledSampler
from kdpipe.training import checkpoints, metrics
from kdpipe.training.augmentation import AugmentConfig, make_generator
from kdpipe.training.devices import Runtime
from kdpipe.training.models import count_parameters
from kdpipe.training.networks import Networks, NetworkSpec
from kdpipe.training.recipes import Hyper, Recipe, total_loss
from kdpipe.training.schedules import AugmentationSchedule
from kdpipe.training.stopping import EarlyStop
from kdpipe.training.views import Batch, OnlineViews, StoredViews, to_nchw

LAST = "last.pt"


@dataclass
class LoopConfig:
    """Optimisation and completion settings, always built from ``params.train`` (:meth:`from_train`)
    or ``params.teacher`` (:meth:`from_teacher`): the params schema is the one place for defaults."""

    batch_size: int
    mu: float | None  # None: the pools' ratio, so that every image is drawn equally often
    lr: float
    momentum: float
    weight_decay: float
    warmup_fraction: float
    max_iterations: int
    epoch_iterations: int
    eval_every: int
    checkpoint_every: int
    seed: int
    patience: int = 0  # the teacher step has no early stop
    target_metric: float = 1.01
    teacher_lr_scale: float = 1.0  # only co-training changes the teacher's LR
    # Fine-tuning a pretrained network (the teacher step): the backbone learns at lr x this, is frozen
    # (head alone) for the first iterations, and may keep its pretrained BatchNorm statistics.
    backbone_lr_scale: float = 1.0
    freeze_backbone_iterations: int = 0
    freeze_batchnorm: bool = False
    # Batches whose host part (indices, gather into pinned memory) is assembled ahead, in a background
    # thread, while the device computes; 0 assembles each on the training thread. Results are the same.
    prefetch: int = 2
    keep_checkpoint: str = "best"  # "best" (on validation) or "last": the checkpoint that is the result

    @classmethod
    def from_train(cls, tp, recipe=None) -> LoopConfig:
        """From ``params.train``; ``keep_checkpoint: auto`` asks ``recipe`` (best when none is given)."""
        # The fine-tuning fields (backbone_lr_scale...) are teacher settings: the student keeps their defaults.
        names = [name for name in cls.__dataclass_fields__ if name in type(tp).model_fields]
        values = {name: getattr(tp, name) for name in names}
        if values.get("keep_checkpoint") == "auto":
            values["keep_checkpoint"] = "last" if recipe is not None and recipe.keeps_last else "best"
        return cls(**values)

    @classmethod
    def from_teacher(cls, tp, iterations: int | None = None) -> LoopConfig:
        """The teacher's fine-tuning loop; ``iterations`` (default ``tp.max_iterations``) as the teacher
        step sizes them to the number of labels."""
        iterations = int(iterations or tp.max_iterations)
        every = min(tp.eval_every, iterations)
        return cls(
            batch_size=tp.batch_size,
            mu=0.0,
            lr=tp.lr,
            momentum=tp.momentum,
            weight_decay=tp.weight_decay,
            warmup_fraction=tp.warmup_fraction,
            max_iterations=iterations,
            epoch_iterations=every,
            eval_every=every,
            checkpoint_every=every,
            backbone_lr_scale=tp.backbone_lr_scale,
            freeze_backbone_iterations=int(round(tp.freeze_backbone_fraction * iterations)),
            freeze_batchnorm=tp.freeze_batchnorm,
            seed=tp.seed,
        )


@dataclass
class TrainingData:
    """uint8 NHWC arrays (memory-mapped or in RAM) the loop samples from."""

    class_names: list[str]
    image_size: int
    train_x: np.ndarray
    train_y: np.ndarray
    unlabeled_x: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    labeled_views: np.ndarray | None = None  # (N, K, H, W, 3) from the augment step
    unlabeled_views: np.ndarray | None = None
    view_kinds: list[str] | None = None  # "weak" / "strong" per stored view
    labeled_logits: np.ndarray | None = None  # (N, K, C): the frozen teacher's logits on each stored view
    unlabeled_logits: np.ndarray | None = None
    teacher_train_x: np.ndarray | None = None  # teacher-resolution copies from prepare, when it kept them
    teacher_val_x: np.ndarray | None = None
    teacher_unlabeled_x: np.ndarray | None = None
    data_version: str = ""  # the prepared data's version (its manifest), for resume fingerprints


@dataclass
class RunFiles:
    """Where a run writes and how it reports: its folder, the file name of each trained network's best
    checkpoint, the names its history uses (the teacher step trains its network in the student's seat,
    and its curve must not read ``val_acc_student``), the settings a resume must match, and its
    progress-bar label."""

    out_dir: str | os.PathLike
    best_names: dict[str, str] = field(
        default_factory=lambda: {"student": "student.pt", "teacher": "teacher.pt"}
    )
    report_names: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    desc: str = "distill"
    progress: bool = True


def batch_split(batch_size: int, mu: float | None, labeled: int, unlabeled: int) -> tuple[int, float]:
    """(labeled images per step, unlabeled per labeled one). With a number ``mu``: ``batch_size``
    labeled and ``round(mu * batch_size)`` unlabeled images. With ``mu`` None: ``batch_size`` images in
    all, shared in proportion to the two pools, so that every image, labeled or not, is drawn about
    equally often -- what distillation through the unlabeled images wants (the labels reach the
    student through the teacher, and a few labeled images drawn far more often are memorised)."""
    if mu is not None:
        return batch_size, float(mu)
    if unlabeled == 0:
        return batch_size, 0.0
    share = max(1, min(batch_size - 1, round(batch_size * labeled / (labeled + unlabeled))))
    return share, (batch_size - share) / share


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, runtime: Runtime, batch_size: int = 512
) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for uint8 NHWC images, on the CPU."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = runtime.to_device(to_nchw(images[start : start + batch_size])).float().div_(255.0)
        if runtime.wants_channels_last(model):
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            outputs.append(model(x).float().cpu())
        release(images)  # one batch of mapped pages resident at a time (see mapped.py)
    model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 accuracy on the validation split, the same definition as the ONNX steps' (one function);
    the split is never empty here (Trainer._check_data)."""
    return metrics.accuracy(logits.numpy(), labels)


class Trainer:
    """Runs one recipe to completion, resuming from ``out_dir/last.pt`` when it exists."""

    def __init__(
        self,
        recipe: Recipe,
        data: TrainingData,
        cfg: LoopConfig,
        hyper: Hyper,
        runtime: Runtime,
        networks: NetworkSpec,
        run: RunFiles,
        augment_cfg: AugmentConfig | None = None,
        use_cached_logits: bool = True,
    ):
        self.recipe, self.data, self.cfg, self.hyper, self.rt = recipe, data, cfg, hyper, runtime
        self.run_files = run
        self.out_dir = Path(run.out_dir)
        # Without a validation split (prepare.val_fraction 0: every label trains) the loop runs its fixed
        # schedule and keeps the last checkpoint: nothing can pick a "best" one honestly.
        self.validates = len(data.val_y) > 0
        # Which checkpoint is the result: the last one without a validation split, or when the config
        # says so (function matching on a cosine schedule ends at its best; a validation split of a
        # few hundred images picks among its checkpoints by noise); else the best on validation.
        self.keeps_last = not self.validates or cfg.keep_checkpoint == "last"
        self._check_data()

        torch.manual_seed(cfg.seed)  # same initial weights for the same seed
        self.nets = Networks(networks, recipe, len(data.class_names), data.image_size, cfg, runtime)
        self.scaler = runtime.grad_scaler()
        n_unlabeled = self._unlabeled_pool() if recipe.uses_unlabeled else 0
        self.labeled_per_step, self.mu = batch_split(
            cfg.batch_size, cfg.mu if recipe.uses_unlabeled else 0.0, len(data.train_x), n_unlabeled
        )
        self.sampler = LabeledUnlabeledSampler(
            len(data.train_x),
            n_unlabeled,
            self.labeled_per_step,
            self.mu,
            cfg.seed,
            runtime.rank,
            runtime.world_size,
        )
        # each rank augments differently, like it samples differently
        self.gen = make_generator(cfg.seed * 1000 + 17 + runtime.rank, runtime.device)
        # an "epoch" of the adaptive schedule: epoch_iterations, or one pass over the labeled images
        self.epoch_iterations = cfg.epoch_iterations or max(
            1, math.ceil(len(data.train_x) / (cfg.batch_size * runtime.world_size))
        )
        self.epochs = max(2, math.ceil(cfg.max_iterations / self.epoch_iterations))
        self.schedule = AugmentationSchedule.from_params(hyper, self.epochs) if recipe.uses_schedule else None
        if recipe.reads_stored_views:
            self.views = StoredViews(
                recipe, data, runtime, cfg.seed, self.schedule, use_cache=use_cached_logits
            )
        else:
            self.views = OnlineViews(
                recipe, data, augment_cfg or AugmentConfig(), self.gen, runtime, self.schedule
            )
        self.batches = BatchStream(self.sampler, self.views, cfg.prefetch)

        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_so_far = checkpoints.BestSoFar()
        self.stopper = EarlyStop(cfg.patience, cfg.target_metric)
        # Running sums of the loss terms since the last record, as float64 device tensors: adding the
        # float32 values in float64 gives exactly the Python-float sums, without a host sync per step.
        self.running: dict[str, float | torch.Tensor] = {}
        self.running_steps = 0
        self.train_seconds = 0.0
        self._frozen_teacher_val: torch.Tensor | None = None

    # The networks, by the names the rest of kdpipe (and its tests) use.
    @property
    def student(self) -> nn.Module:
        return self.nets.student

    @property
    def teacher(self) -> nn.Module | None:
        return self.nets.teacher

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        return self.best_so_far.best

    # ------------------------------------------------------------------------------ set-up
    def _check_data(self) -> None:
        d, r = self.data, self.recipe
        if len(d.train_x) == 0:
            raise KdpipeError("no labeled training images after prepare")
        if not self.validates and self.cfg.patience:
            raise KdpipeError(
                "train.patience stops on the validation accuracy, and there is no validation split "
                "(prepare.val_fraction 0): set train.patience to 0"
            )
        if not self.validates and r.uses_schedule and self.hyper.schedule_rule == "adaptive":
            raise KdpipeError(
                f"recipe '{r.name}': the adaptive schedule follows the validation accuracy, and there is "
                "no validation split (prepare.val_fraction 0): set train.schedule_rule to linear or fixed"
            )
        if r.uses_unlabeled and len(d.unlabeled_x) == 0 and (self.cfg.mu is None or self.cfg.mu > 0):
            print(
                f"warning: recipe '{r.name}' uses unlabeled data but there is none; training on labeled data only"
            )
        if r.reads_stored_views:
            if d.labeled_views is None:
                raise KdpipeError(
                    f"recipe '{r.name}' reads the augmentation sets: run `kdpipe augment` first"
                )
            stored = d.labeled_views.shape[1]
            if stored < r.num_views:
                raise KdpipeError(
                    f"train.views={r.num_views} but the augment step stored only {stored} views "
                    f"(set augment.views >= {r.num_views})"
                )

    def _unlabeled_pool(self) -> int:
        if self.recipe.reads_stored_views:
            return 0 if self.data.unlabeled_views is None else len(self.data.unlabeled_views)
        return len(self.data.unlabeled_x)

    # ------------------------------------------------------------------------------ one step
    # The public seam (benchmarks and tools use these, never the loop's internals): next_batch() draws
    # what the loop would train on next, step() is one optimisation step (on a given batch, or the
    # next one) without counting it, train_step() is one counted step of the loop.
    def next_batch(self) -> Batch:
        """Sample one batch and get the recipe's views (labels use -1 for unlabeled samples)."""
        return self.batches.next()

    def step(self, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step on ``batch`` (default: the next one); the loss terms' values as
        detached device tensors (no host sync). The iteration count does not move: see train_step."""
        if self.nets.modes_change_during_training:
            self.nets.set_train_modes(self.iteration)
        batch = self.next_batch() if batch is None else batch
        if self.schedule is not None:
            self.hyper.w = self.schedule.current()[2]
        with self.rt.autocast():
            out = self.nets.forward(batch)
        loss, parts = total_loss(self.recipe, out, self.hyper, self.nets.projection_ddp)
        for opt in self.nets.optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in self.nets.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        for schedule in self.nets.lr_schedules:
            schedule.step()
        return parts

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, Any]:
        if not self.rt.distributed:
            return self._evaluate_local()
        # Under DDP each rank's BatchNorm statistics come from its own shard of the last batches, so
        # rank-local evaluations can differ; the schedule, best-checkpoint and early-stop decisions
        # must agree on every rank (a rank that stops alone hangs the others), so all ranks use rank
        # 0's evaluation (the model rank 0 checkpoints).
        import torch.distributed as dist

        shared = [self._evaluate_local() if self.rt.is_main else None]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def _teacher_val_logits(self) -> torch.Tensor:
        """The teacher's validation logits; a frozen teacher's never change, so they are computed once
        (a pretrained teacher at its own resolution costs more to evaluate than the student)."""
        if self.recipe.trains_teacher or self._frozen_teacher_val is None:
            logits = predict_logits(self.teacher, self.data.val_x, self.rt)
            if not self.recipe.trains_teacher:
                self._frozen_teacher_val = logits
            return logits
        return self._frozen_teacher_val

    def _evaluate_local(self) -> dict[str, Any]:
        d = self.data
        if not self.validates:
            return {}
        s_logits = predict_logits(self.student, d.val_x, self.rt)
        record: dict[str, Any] = {"val_acc_student": accuracy(s_logits, d.val_y)}
        if self.teacher is not None:
            t_logits = self._teacher_val_logits()
            record["val_acc_teacher"] = accuracy(t_logits, d.val_y)
            record["agreement"] = (
                float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean())
                if len(d.val_y)
                else float("nan")
            )
        return record

    def _save_best(self, record: dict[str, Any]) -> None:
        """Write each trained network's checkpoint when this evaluation beats its best. A teacher that
        this run does not train is an input, not a result: it is never saved here (select must not
        ship the input teacher unchanged; its accuracy is still recorded)."""
        names = self.run_files.best_names
        archs = {"student": self.nets.spec.student_arch, "teacher": self.nets.spec.teacher_arch}
        for role, model in (("student", self.student), ("teacher", self.nets.trained_teacher)):
            acc = record.get(f"val_acc_{role}")
            if self.keeps_last and model is not None:
                self.best_so_far.keep_latest(role, self.iteration, acc)  # the last checkpoint is the result
            elif model is None or acc is None or not self.best_so_far.offer(role, acc, self.iteration):
                continue
            if self.rt.is_main:
                best = self.best[role]
                meta = {
                    "val_accuracy": best["accuracy"],
                    "iteration": self.iteration,
                    "role": role,
                    "recipe": self.recipe.name,
                    "parameters": count_parameters(model),
                    "trained_in_run": True,
                }
                ckpt = checkpoints.model_checkpoint(
                    model,
                    archs[role],
                    len(self.data.class_names),
                    self.data.image_size,
                    self.data.class_names,
                    meta,
                )
                checkpoints.save(ckpt, self.out_dir / names[role])

    def _after_eval(self, record: dict[str, Any]) -> None:
        if self.validates:
            self.stopper.update(record["val_acc_student"])

    @property
    def stop_reason(self) -> str | None:
        """Why training stops (early stop, target, or max_iterations once reached); None while it runs."""
        return self.stopper.reason

    @stop_reason.setter
    def stop_reason(self, reason: str | None) -> None:
        self.stopper.reason = reason

    def _record(self, epoch_end: bool) -> dict[str, Any]:
        record = {
            "iteration": self.iteration,
            "epoch": self.iteration / self.epoch_iterations,
            "lr": self.nets.opt_s.param_groups[0]["lr"],
        }
        record.update({f"loss_{k}": float(v) / max(1, self.running_steps) for k, v in self.running.items()})
        record.update(self._evaluate())
        if self.schedule is not None:
            p1, p2, w = self.schedule.current()
            record.update({"p1": p1, "p2": p2})
            if self.recipe.weights_by_schedule:  # full uses the schedule for view strength only
                record["w"] = w
            # the last, partial epoch (max_iterations not a multiple of the epoch's length) counts too
            if epoch_end or self.iteration == self.cfg.max_iterations:
                self.schedule.step(record.get("val_acc_student"))
        record["train_seconds"] = round(self.train_seconds, 3)
        self.running, self.running_steps = {}, 0
        self._save_best(record)
        self._after_eval(record)
        self.history.append(record)
        return record

    # ------------------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        """This rank's random streams: augmentation generators and torch's global RNGs."""
        return {
            "gen": self.gen.get_state(),
            "gen_device": self.rt.device.type,
            "views": self.views.state_dict() if isinstance(self.views, StoredViews) else None,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.rt.device) if self.rt.device.type == "cuda" else None,
        }

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        saved_on = rng.get("gen_device", "cpu")
        if saved_on == self.rt.device.type:
            self.gen.set_state(rng["gen"])
        else:
            # A CPU and a CUDA generator have different states (5056 bytes against 16): a run resumed
            # on another kind of device cannot continue the augmentation stream. It restarts it from
            # the seed and the iteration, so the resume stays deterministic on this device.
            self.gen.manual_seed(self.cfg.seed * 1000 + 17 + self.rt.rank + 7919 * self.iteration)
            if self.rt.is_main:
                print(
                    f"note: the resume state was written on {saved_on}, this run is on {self.rt.device.type}: "
                    "the augmentation stream restarts from the seed (the weights and the schedule resume as saved)"
                )
        if isinstance(self.views, StoredViews):
            self.views.load_state_dict(rng["views"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.rt.device)

    def _every_rank(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (a collective call under DDP)."""
        if not self.rt.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    # What a resume restores, each listed once: the parts that have state_dict()/load_state_dict()
    # (None where this run has no such part) ...
    def _stateful_parts(self) -> dict[str, Any]:
        return {
            **self.nets.stateful_parts(),
            "sampler": self.sampler,
            "schedule": self.schedule,
            "early_stop": self.stopper,
            "best": self.best_so_far,
        }

    # ... and the loop's plain values: progress, records, the best so far, early-stop bookkeeping.
    RESUMED_VALUES = ("iteration", "history", "running", "running_steps", "train_seconds")

    def state_dict(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The resume state. ``rng_per_rank`` holds every rank's random streams (each rank augments
        differently); without it, only this process's. Also the scaler (see :meth:`_load_scaler`)
        and the fingerprint of the settings, which a resume must match."""
        state = {
            name: None if part is None else _portable_state(part)
            for name, part in self._stateful_parts().items()
        }
        state.update({name: getattr(self, name) for name in self.RESUMED_VALUES})
        state["running"] = {k: float(v) for k, v in self.running.items()}  # portable, like the networks
        state.update(
            scaler=self.scaler.state_dict(),
            rng=rng_per_rank or [self._rng_state()],
            fingerprint=self.run_files.fingerprint,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.stop()  # batches drawn ahead from the old state must not be used
        for name, part in self._stateful_parts().items():
            if part is not None and state.get(name) is not None:
                part.load_state_dict(state[name])
        for name in self.RESUMED_VALUES:
            setattr(self, name, copy.deepcopy(state[name]))
        self._load_scaler(state["scaler"])
        rng = state["rng"]
        if len(rng) != self.rt.world_size:  # the sampler's own check refuses this first
            raise KdpipeError(f"resume state of {len(rng)} process(es), this run has {self.rt.world_size}")
        self._set_rng_state(rng[self.rt.rank])

    def _load_scaler(self, saved: dict[str, Any]) -> None:
        """fp16 loss-scaling state, when this run and the saved one both scale. A run resumed with
        another precision (an fp32 state on an fp16 GPU, or the reverse) starts a fresh scaler: the
        scale is a running estimate that the new precision re-learns within a few steps."""
        if self.scaler.is_enabled() and saved:
            self.scaler.load_state_dict(saved)

    def save_last(self) -> None:
        """Every rank must call this (the random streams are gathered); rank 0 writes."""
        # The sampler and the view chooser run ahead while batches are prefetched: put them back to
        # the last consumed batch (the thread restarts with the next batch).
        self.batches.stop()
        rng_per_rank = self._every_rank(self._rng_state())
        if self.rt.is_main:
            checkpoints.save(self.state_dict(rng_per_rank), self.out_dir / LAST)

    def try_resume(self) -> bool:
        """Resume from ``last.pt`` if it belongs to the same configuration; True if resumed."""
        path = self.out_dir / LAST
        if not path.exists():
            return False
        state = checkpoints.load(path)
        if state.get("fingerprint") != self.run_files.fingerprint:
            if self.rt.is_main:
                print(f"{path}: written with other settings; starting over")
            return False
        self.load_state_dict(state)
        if self.rt.is_main:
            print(f"resuming from {path} at iteration {self.iteration}")
        return True

    def _remove_stale_best(self) -> None:
        """A fresh run must not leave an earlier run's best checkpoints in its output folder (DVC keeps
        the folder between runs for resuming): select would take them for this run's results."""
        if self.rt.is_main:
            for name in self.run_files.best_names.values():
                (self.out_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ the loop
    def _done(self) -> bool:
        return self.iteration >= self.cfg.max_iterations or self.stop_reason is not None

    def run(self) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.try_resume():
            self._remove_stale_best()
        self.nets.set_train_modes(self.iteration)
        desc = self.run_files.desc
        bar = Progress(
            self.cfg.max_iterations,
            desc,
            initial=self.iteration,
            enabled=self.run_files.progress and self.rt.is_main,
        )
        try:
            with self.batches.prefetching():  # the thread stops however the loop ends
                while not self._done():
                    self.train_step()
                    epoch_end = self.iteration % self.epoch_iterations == 0
                    if (
                        epoch_end
                        or self.iteration % self.cfg.eval_every == 0
                        or self.iteration == self.cfg.max_iterations
                    ):
                        record = self._record(epoch_end)
                        bar.write(_format_record(desc, self._renamed(record)))
                        bar.show(loss=record["loss_total"])
                    if self.iteration % self.cfg.checkpoint_every == 0 or self._done():
                        self.save_last()
                    bar.update(1)
        finally:
            bar.close()
        if self.stop_reason is None:
            self.stop_reason = f"max_iterations {self.cfg.max_iterations} reached"
        self.save_last()
        return self.summary()

    def train_step(self) -> None:
        """One step of the training loop: an optimisation step on the next batch, counted (iteration,
        training time, the running loss averages the next record reports)."""
        started = time.perf_counter()
        parts = self.step()
        self.iteration += 1
        self.train_seconds += time.perf_counter() - started
        for key, value in parts.items():
            self.running[key] = self.running.get(key, 0.0) + value.double()
        self.running_steps += 1

    def summary(self) -> dict[str, Any]:
        summary = {
            "recipe": self.recipe.name,
            "iterations": self.iteration,
            "stop_reason": self.stop_reason,
            "train_seconds": round(self.train_seconds, 3),
            "best_student": self.best["student"],
            "loop": asdict(self.cfg),
        }
        if self.teacher is not None:
            summary["best_teacher"] = self.best["teacher"]
        if self.schedule is not None:
            summary["schedule"] = self.schedule.history
        return summary

    def _renamed(self, record: dict[str, Any]) -> dict[str, Any]:
        return {self.run_files.report_names.get(k, k): v for k, v in record.items()}

    def write_reports(self) -> None:
        """history.json (one entry per evaluation, keys relabelled by ``report_names``) and
        schedule.json (the adaptive schedule, per epoch; an empty list for a recipe without the schedule, because
        the file is a declared DVC output of distill whatever the recipe)."""
        if not self.rt.is_main:
            return
        history = [self._renamed(record) for record in self.history]
        write_json(self.out_dir / "history.json", history)
        write_json(self.out_dir / "schedule.json", [] if self.schedule is None else self.schedule.history)


def _portable_state(part: Any) -> dict[str, Any]:
    """``part.state_dict()``; a network's tensors on the CPU, so a resume state loads on any device."""
    if isinstance(part, nn.Module):
        return {k: v.detach().cpu() for k, v in part.state_dict().items()}
    return part.state_dict()


def _format_record(desc: str, record: dict[str, Any]) -> str:
    keys = ("val_acc_student", "val_acc_teacher", "agreement", "p1", "w", "loss_total")
    shown = " ".join(f"{k}={record[k]:.4f}" for k in keys if k in record and record[k] is not None)
    return f"{desc} it {record['iteration']}: {shown}"
