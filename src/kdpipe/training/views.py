"""Where a training step's images come from: views built on the device, or the stored augmentation sets.

A recipe asks for ``num_views`` views per sample following its ``view_plan``: ``weak`` (one weak
view), ``any`` (one stored view, weak or strong), ``scheduled`` (view 0 strong with probability
``p1``, the others ``p2``, from the adaptive augmentation schedule) or ``stored`` (``num_views``
different stored views, for multi-view consistency). :class:`OnlineViews` augments on the device at
every step; :class:`StoredViews` picks among the augment step's K views, with the frozen teacher's
cached logits on them.

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data.rowio import gather_rows
from kdpipe.training.augmentation import AugmentConfig, augment


@dataclass
class Batch:
    """One step's inputs: per view, the student's images, the teacher's images (or None when the
    teacher is not run) and the cached teacher logits (or None when they are not cached)."""

    labels: torch.Tensor  # int64, -1 for unlabeled samples
    student: list[torch.Tensor]
    teacher: list[torch.Tensor | None]
    teacher_logits: list[torch.Tensor | None]


@dataclass
class HostBatch:
    """One step's inputs as the host assembles them (possibly ahead, in a background thread): buffers
    ready for a single copy to the device, pinned there when the device is a GPU."""

    labels: torch.Tensor  # int64, -1 for unlabeled samples
    images: list[torch.Tensor]  # uint8 NHWC: the raw images (online views) or one per stored view
    teacher_logits: list[torch.Tensor | None]  # per view: cached logits in their stored dtype, or None


def to_nchw(batch: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor (augmentation converts to float on the device)."""
    return torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).contiguous()


def gathers_channels_first(runtime) -> bool:
    """Where images change from the arrays' NHWC to the networks' NCHW layout. On a CPU device,
    while they are gathered: one strided copy per row in the background thread (measured at 224 px:
    3x the rate of a plain copy followed by a permute on the training thread). On a GPU, on the
    device: the host copy stays a memcpy per row and the GPU permutes at memory speed."""
    return runtime.device.type == "cpu"


def nchw_on_device(images: torch.Tensor, runtime) -> torch.Tensor:
    """A host uint8 batch from :func:`gather_batch` -> uint8 NCHW on the device: the bytes cross once
    (the same contiguous NCHW tensor :func:`to_nchw` makes on the host)."""
    x = runtime.to_device(images)
    return x if gathers_channels_first(runtime) else x.permute(0, 3, 1, 2).contiguous()


def gather_batch(
    labeled: np.ndarray,
    unlabeled: np.ndarray,
    l_index: tuple[np.ndarray, ...],
    u_index: tuple[np.ndarray, ...],
    runtime,
    channels_first: bool = False,
) -> torch.Tensor:
    """The labeled rows then the unlabeled ones, in one new host buffer (pinned for a GPU);
    ``channels_first``: HWC images are written as CHW (see :func:`gathers_channels_first`)."""
    nl, nu = len(l_index[0]), len(u_index[0])
    row_shape = labeled.shape[len(l_index) :]
    if channels_first:
        height, width, channels = row_shape
        row_shape = (channels, height, width)
    buffer = runtime.host_buffer((nl + nu, *row_shape), labeled.dtype)
    out = buffer.numpy()
    gather_rows(labeled, l_index, out[:nl], channels_first)
    if nu:
        gather_rows(unlabeled, u_index, out[nl:], channels_first)
    return buffer


def shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float NCHW batch to ``size x size`` (identity if already there)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def scaled_config(cfg: AugmentConfig, from_size: int, to_size: int) -> AugmentConfig:
    """The augmentation config for images of ``to_size``: the crop padding (in pixels) scales with the
    image, so a view at the teacher's resolution is the same crop as one at the student's."""
    from dataclasses import replace

    if from_size == to_size:
        return cfg
    return replace(cfg, pad=int(round(cfg.pad * to_size / from_size)))


def labels_tensor(train_y: np.ndarray, l_idx: np.ndarray, n_unlabeled: int) -> torch.Tensor:
    """The batch's labels on the host, -1 for the unlabeled samples."""
    labels = np.concatenate([np.asarray(train_y)[l_idx], np.full(n_unlabeled, -1, dtype=np.int64)])
    return torch.from_numpy(labels.astype(np.int64))


class OnlineViews:
    """Views augmented on the device at every step (see the module docstring)."""

    def __init__(self, recipe, data, aug_cfg: AugmentConfig, gen: torch.Generator, runtime, schedule=None):
        self.recipe, self.data, self.gen, self.rt, self.schedule = recipe, data, gen, runtime, schedule
        # A teacher-resolution copy is used only when a teacher is run on the views.
        self.big = data.teacher_train_x is not None and recipe.uses_teacher
        source = data.teacher_train_x if self.big else data.train_x
        # The network in the student's seat gets its views at the resolution of its own arrays: the
        # student's size in distill, the teacher copy's when the teacher step fine-tunes on that copy
        # (its views must be as sharp as the validation images it is judged on).
        self.student_size = int(data.train_x.shape[1])
        self.cfg = scaled_config(aug_cfg, data.image_size, int(source.shape[1]))

    def draw_key(self) -> None:
        """What the host part's random draws depend on: nothing (it draws nothing; see :class:`StoredViews`)."""
        return None

    def host(self, l_idx: np.ndarray, u_idx: np.ndarray, key: None = None) -> HostBatch:
        """The raw images of the batch (host work, safe in a background thread)."""
        d = self.data
        labeled, unlabeled = (
            (d.teacher_train_x, d.teacher_unlabeled_x) if self.big else (d.train_x, d.unlabeled_x)
        )
        images = gather_batch(
            labeled, unlabeled, (l_idx,), (u_idx,), self.rt, gathers_channels_first(self.rt)
        )
        return HostBatch(labels_tensor(d.train_y, l_idx, len(u_idx)), [images], [None])

    def _probabilities(self) -> list[float]:
        """Per view, the probability that a sample gets the strong policy."""
        plan, k = self.recipe.view_plan, self.recipe.num_views
        if plan == "weak":
            return [0.0] * k
        if plan == "scheduled":
            p1, p2, _ = self.schedule.current()
            return [p1 if v == 0 else p2 for v in range(k)]
        # "any" / "stored" with the teacher run online: fresh views, strong in the share the augment
        # step would have stored
        return [self.cfg.strong_share] * k

    def on_device(self, host: HostBatch) -> Batch:
        """The views, augmented on the device. Runs on the training thread: the device generator's
        stream is consumed in step order, and the schedule's probabilities are the current ones."""
        x = nchw_on_device(host.images[0], self.rt)
        views = [augment(x, self.gen, p, self.cfg) for p in self._probabilities()]
        wanted = set(self.recipe.teacher_views) if self.recipe.uses_teacher else set()
        return Batch(
            labels=self.rt.to_device(host.labels),
            student=[shrink(v, self.student_size) for v in views],
            teacher=[v if k in wanted else None for k, v in enumerate(views)],
            teacher_logits=[None] * len(views),
        )

    def next(self, l_idx: np.ndarray, u_idx: np.ndarray) -> Batch:
        return self.on_device(self.host(l_idx, u_idx))


class StoredViews:
    """Views (and cached teacher logits) picked from the augment step's sets (see the module docstring)."""

    def __init__(self, recipe, data, runtime, seed: int, schedule=None, use_cache: bool = True):
        from kdpipe.core.errors import KdpipeError

        self.recipe, self.data, self.rt, self.schedule = recipe, data, runtime, schedule
        kinds = data.view_kinds or ["strong"] * data.labeled_views.shape[1]
        self.strong = torch.tensor([k == "strong" for k in kinds])
        if len(kinds) < recipe.num_views:
            raise KdpipeError(
                f"recipe '{recipe.name}' compares {recipe.num_views} views but the augment step stored "
                f"only {len(kinds)} (set augment.views >= {recipe.num_views})"
            )
        self.cached = use_cache and data.labeled_logits is not None
        # View choices are drawn on the CPU (they index host arrays), from their own resumable stream.
        self.gen = torch.Generator().manual_seed(int(seed) * 7919 + 101 + runtime.rank)

    def _probabilities(self) -> list[float | None]:
        """Per view slot: the probability of a strong view, or None for "any view not used yet"."""
        plan, k = self.recipe.view_plan, self.recipe.num_views
        if plan == "weak":
            return [0.0] * k
        if plan == "scheduled":
            p1, p2, _ = self.schedule.current()
            return [p1 if v == 0 else p2 for v in range(k)]
        return [None] * k  # "any" and "stored": distinct stored views, weak or strong

    def draw_key(self) -> tuple[float | None, ...]:
        """What the host part's random draws depend on that the loop changes between steps: the
        schedule's probabilities. A batch prefetched under other probabilities is drawn again."""
        return tuple(self._probabilities())

    def choose(self, n: int, probabilities: Sequence[float | None] | None = None) -> list[torch.Tensor]:
        """For each view slot, the stored view index of each of ``n`` samples; ``probabilities`` (one
        per slot, see :meth:`_probabilities`) default to the schedule's current ones.

        A slot with a probability gets a view of the kind it drew (strong with probability p): an
        unused one of that kind if there is one, else one of that kind again. The kind is what the
        schedule asks for, so it comes before distinctness: with one weak and one strong view stored,
        two weak slots share the weak view rather than one of them turning strong. A slot without a
        probability ("any", "stored") takes an unused view of either kind."""
        k = len(self.strong)
        used = torch.zeros(n, k, dtype=torch.bool)
        picks = []
        for p in self._probabilities() if probabilities is None else probabilities:
            scores = torch.rand(n, k, generator=self.gen)  # uniform choice among the allowed views
            if p is None:
                allowed = ~used
            else:
                want_strong = torch.rand(n, generator=self.gen) < p
                kind = self.strong.view(1, k) == want_strong.view(n, 1)
                fresh = kind & ~used
                # No view of the wanted kind left unused: reuse one of that kind. A store without any
                # view of that kind (all weak or all strong) falls back to any unused view.
                allowed = torch.where(fresh.any(1, keepdim=True), fresh, kind)
                allowed = torch.where(allowed.any(1, keepdim=True), allowed, ~used)
            pick = scores.masked_fill(~allowed, -1.0).argmax(1)
            used[torch.arange(n), pick] = True
            picks.append(pick)
        return picks

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])

    def host(
        self, l_idx: np.ndarray, u_idx: np.ndarray, key: tuple[float | None, ...] | None = None
    ) -> HostBatch:
        """Chooses the stored views (this stream's generator) and gathers them, with their cached
        logits where the teacher wants them: host work, safe in a background thread. ``key`` is
        :meth:`draw_key` as the training thread last read it."""
        d = self.data
        nl = len(l_idx)
        wanted = set(self.recipe.teacher_views) if self.recipe.uses_teacher else set()
        images, logits = [], []
        for view, pick in enumerate(self.choose(nl + len(u_idx), key)):
            pick = pick.numpy()
            l_index, u_index = (l_idx, pick[:nl]), (u_idx, pick[nl:])
            images.append(
                gather_batch(
                    d.labeled_views,
                    d.unlabeled_views,
                    l_index,
                    u_index,
                    self.rt,
                    gathers_channels_first(self.rt),
                )
            )
            cached = self.cached and view in wanted
            logits.append(
                gather_batch(d.labeled_logits, d.unlabeled_logits, l_index, u_index, self.rt)
                if cached
                else None
            )
        return HostBatch(labels_tensor(d.train_y, l_idx, len(u_idx)), images, logits)

    def on_device(self, host: HostBatch) -> Batch:
        """The views as the networks take them: float NCHW in [0, 1] on the device."""
        wanted = set(self.recipe.teacher_views) if self.recipe.uses_teacher else set()
        students, teachers, logits = [], [], []
        for view, (images, stored_logits) in enumerate(zip(host.images, host.teacher_logits, strict=True)):
            x = nchw_on_device(images, self.rt).float().div_(255.0)
            students.append(x)
            cached = None if stored_logits is None else self.rt.to_device(stored_logits).float()
            logits.append(cached)
            # Without a cache the teacher runs on the very same stored view.
            teachers.append(x if view in wanted and cached is None else None)
        return Batch(self.rt.to_device(host.labels), students, teachers, logits)

    def next(self, l_idx: np.ndarray, u_idx: np.ndarray) -> Batch:
        return self.on_device(self.host(l_idx, u_idx))
