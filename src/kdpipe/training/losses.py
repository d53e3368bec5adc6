"""Loss terms of the training methods (docs/methods.md), as small pure torch functions.

Conventions shared by every function here:

* ``logits`` are ``(N, num_classes)`` tensors; ``p = softmax(z / tau)``.
* ``KL(a||b) = sum_c a_c * log(a_c / b_c)``, averaged over the batch ("batchmean").
* ``labels`` are int64 ``(N,)``; ``-1`` marks an unlabeled sample (docs/methods.md, notation).
* When a term has no sample to work on, it returns a zero that stays in the
  autograd graph, so ``loss.backward()`` and DDP's gradient bookkeeping behave the same as for a
  batch that does have samples (an unused parameter would otherwise stall DDP).

Nothing here reduces over devices; the trainer owns that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

UNLABELED = -1


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p||q)`` from log-probabilities, batch mean: ``mean_n sum_c p * (log p - log q)``."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _masked_mean_ce(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean CE over ``mask``; zero (in the graph) for an empty mask.

    Written without boolean indexing so it never waits for the GPU (no host sync per step).
    """
    per_sample = F.cross_entropy(
        logits, targets.clamp(min=0), reduction="none", label_smoothing=label_smoothing
    )
    # where (not multiply) so an inf loss on an excluded sample cannot turn into NaN
    total = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
    return total / mask.sum().clamp(min=1).to(per_sample.dtype)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labeled samples only.

    ``L = (1 / |M|) * sum_{n in M} -log softmax(z_n)[y_n]`` with ``M = {n : y_n >= 0}``
    (with ``label_smoothing`` e, the target puts 1 - e on ``y_n`` and spreads e over all classes).
    Returns a graph-keeping zero when ``M`` is empty (an all-unlabeled batch).
    """
    return _masked_mean_ce(logits, labels, labels >= 0, label_smoothing)


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Hinton distillation: ``KD = tau^2 * KL(pt || ps)`` with ``p = softmax(z / tau)``.

    The teacher is detached: this term never updates the teacher (as docs/methods.md defines KD). ``tau^2`` keeps the
    gradient scale independent of the temperature.
    """
    log_ps = F.log_softmax(student_logits / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    return tau * tau * _kl(log_pt, log_ps)


def dml(za: torch.Tensor, zb: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Symmetric KL of deep mutual learning: ``0.5 * (KL(pb || pa) + KL(pa || pb))``.

    Nothing is detached, so one backward pass sends gradients into BOTH networks (co-training trains
    student and teacher on the same term). As docs/methods.md defines the mutual term: no ``tau^2`` factor.
    """
    log_pa = F.log_softmax(za / tau, dim=1)
    log_pb = F.log_softmax(zb / tau, dim=1)
    return 0.5 * (_kl(log_pb, log_pa) + _kl(log_pa, log_pb))


def pairwise_consistency(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-view consistency (``consistency``): mean over the ``K(K-1)/2`` view pairs of the squared L2
    distance between the two views' probability vectors, ``||softmax(z_i) - softmax(z_j)||^2``
    (summed over classes), averaged over the samples.

    Summed, not averaged, over classes: the L2 loss between two classification results is a distance
    between vectors. Averaged over classes too, the term shrank by the number of classes and its
    gradient was about 1.5% of the cross-entropy's in ``full`` (it barely acted).
    No stop-gradient: every view is pulled towards the others. Needs ``K >= 2`` views.
    """
    if len(logits) < 2:
        raise ValueError(f"pairwise_consistency needs at least 2 views, got {len(logits)}")
    probs = [F.softmax(z, dim=1) for z in logits]
    terms = [
        ((probs[i] - probs[j]) ** 2).sum(dim=1).mean()
        for i in range(len(probs))
        for j in range(i + 1, len(probs))
    ]
    return torch.stack(terms).mean()


def truth_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Adaptive augmentation's "truth-value" loss on view 2.

    Targets: the label ``y_n`` for labeled samples; the teacher's ``argmax`` for unlabeled samples
    whose teacher confidence ``max softmax(T(x_n))`` (temperature 1) is at least ``threshold``;
    other unlabeled samples are dropped. Averaging: ONE mean over all used samples,
    ``L = (1 / |used|) * sum_{n in used} CE(S_n, target_n)``, so a labeled and a pseudo-labeled
    sample weigh the same. The teacher only picks targets (no gradient). Graph-keeping zero when
    no sample is used.
    """
    with torch.no_grad():
        conf, pseudo = F.softmax(teacher_logits.detach().float(), dim=1).max(dim=1)
    labeled = labels >= 0
    confident = ~labeled & (conf >= threshold)
    targets = torch.where(labeled, labels, pseudo)
    return _masked_mean_ce(student_logits, targets, labeled | confident)


def feature_mse(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    projection: Callable[[torch.Tensor], torch.Tensor],
    detach_teacher: bool = False,
) -> torch.Tensor:
    """Feature matching (co-training, optional): ``mean((projection(fs) - ft)^2)``.

    ``projection`` (a learned linear layer) maps the student's pooled features to the teacher's
    width. By default nothing is detached because co-training trains both networks and the term should
    pull them together; pass ``detach_teacher=True`` when the teacher is frozen / SSLD-style.
    """
    target = teacher_features.detach() if detach_teacher else teacher_features
    return F.mse_loss(projection(student_features), target)
