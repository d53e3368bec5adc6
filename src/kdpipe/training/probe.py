"""Linear probe: a logistic-regression head fitted on a pretrained network's frozen features.

The teacher step starts here (the "LP" of LP-FT, Kumar et al., ICLR 2022). Fitting the head alone on
features that the pretrained backbone computes once is cheap, cannot damage what the backbone knows,
and gives the fine-tuning a head that already points the right way, so the backbone's first updates
are not driven by a random head's large gradients. Its accuracy is also the floor the fine-tuned
teacher must clear: with few labels, full fine-tuning can end below the untuned features.

How well the probe does is estimated by k-fold cross-validation on the labeled training images (every
label is used, no held-out split needed), and on the validation split when there is one. The L2
strength is chosen by the same cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.data.mapped import release
from kdpipe.training.views import to_nchw

# The L2 strengths tried (per sample, on standardised features); the cross-validation picks one.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LBFGS_ITERATIONS = 100


@dataclass
class ProbeResult:
    """The fitted head (for the network's raw features) and how well it does."""

    weight: torch.Tensor  # (num_classes, feature_dim)
    bias: torch.Tensor  # (num_classes,)
    l2: float
    cv_accuracy: float | None  # k-fold on the labeled training images; None with too few of them
    val_accuracy: float | None  # on the validation split; None without one
    folds: int

    def summary(self) -> dict:
        return {
            "l2": self.l2,
            "cv_accuracy": self.cv_accuracy,
            "val_accuracy": self.val_accuracy,
            "folds": self.folds,
        }


@torch.no_grad()
def extract_features(
    model: nn.Module, images: np.ndarray, runtime, flip: bool = False, batch_size: int = 128
) -> torch.Tensor:
    """Pooled features ``(N, D)`` of uint8 NHWC ``images`` (eval mode: BatchNorm uses its statistics);
    with ``flip``, ``(2N, D)``: the images, then their mirror images."""
    was_training = model.training
    model.eval()
    parts: list[torch.Tensor] = []
    mirrored: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        x = runtime.to_device(to_nchw(images[start : start + batch_size])).float().div_(255.0)
        with runtime.autocast():
            parts.append(model.features(x).float().cpu())
            if flip:
                mirrored.append(model.features(x.flip(3)).float().cpu())
        release(images)
    model.train(was_training)
    return torch.cat(parts + mirrored) if parts else torch.empty(0, getattr(model, "feature_dim", 0))


def _standardise(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature means and ONE scale for all features. A per-feature scale would blow up the raw
    weights of the nearly constant features (many pooled activations are almost always zero), and a
    head with huge weights gives the fine-tuning huge first gradients."""
    mean = train.mean(0)
    scale = (train - mean).pow(2).mean().sqrt().clamp(min=1e-6)
    return mean, scale


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty on the weights, by full-batch L-BFGS.

    Features are standardised for the fit (a better conditioned problem) and the result is mapped back
    to raw features, so ``features @ W.T + b`` gives the logits."""
    mean, std = _standardise(features)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw_weight = (weight / std).detach()
    raw_bias = (bias - (weight * (mean / std)).sum(1)).detach()
    return raw_weight, raw_bias


def _accuracy(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> float:
    return float(((features @ weight.T + bias).argmax(1) == labels).float().mean())


def fold_of(n: int, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number for each of ``n`` samples (seeded): each class spread evenly."""
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = np.arange(len(members)) % folds
    return fold


def _cross_validate(
    features: torch.Tensor,
    labels: torch.Tensor,
    copies: int,
    num_classes: int,
    l2: float,
    fold: np.ndarray,
    folds: int,
) -> float:
    """Accuracy out of fold: each fold scored by a head fitted on the others. ``features`` holds
    ``copies`` feature rows per image (the image, its mirror image): an image's copies share its fold,
    and only the first copy is scored."""
    n = len(fold)
    correct = 0
    for k in range(folds):
        held = torch.from_numpy(fold == k)
        if not held.any() or held.all():
            continue
        fit = torch.cat([~held] * copies)
        weight, bias = fit_logistic(features[fit], labels[fit], num_classes, l2)
        correct += _accuracy(features[:n][held], labels[:n][held], weight, bias) * int(held.sum())
    return correct / n


def fit_probe(
    model: nn.Module,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    num_classes: int,
    runtime,
    flip: bool = False,
    folds: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Fit the probe on ``model``'s frozen features of the labeled training images; choose its L2
    strength by ``folds``-fold cross-validation (when every class has at least 2 images), and score it."""
    labels = torch.as_tensor(np.array(train_y, dtype=np.int64))
    copies = 2 if flip else 1
    features = extract_features(model, train_x, runtime, flip=flip)
    all_labels = torch.cat([labels] * copies)
    smallest = int(np.bincount(labels.numpy(), minlength=num_classes).min()) if len(labels) else 0
    folds = min(folds, smallest)
    scores: dict[float, float] = {}
    if folds >= 2:
        fold = fold_of(len(labels), labels.numpy(), folds, seed)
        for l2 in L2_GRID:
            scores[l2] = _cross_validate(features, all_labels, copies, num_classes, l2, fold, folds)
        l2 = max(L2_GRID, key=lambda value: (scores[value], value))  # ties: the stronger penalty
    else:
        l2 = 1e-2  # too few images per class to cross-validate: a middling penalty
    weight, bias = fit_logistic(features, all_labels, num_classes, l2)
    val_accuracy = None
    if val_x is not None and val_y is not None and len(val_y):
        val_features = extract_features(model, val_x, runtime)
        val_accuracy = _accuracy(val_features, torch.as_tensor(np.array(val_y, dtype=np.int64)), weight, bias)
    return ProbeResult(weight, bias, l2, scores.get(l2), val_accuracy, folds if folds >= 2 else 0)


def head_linear(model: nn.Module) -> nn.Linear:
    """The final Linear layer of a kdpipe model's head (after a Dropout, when it has one)."""
    head = model.head
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model {getattr(model, 'arch', '?')}: its head has no Linear layer")
    return linears[-1]


@torch.no_grad()
def install(model: nn.Module, probe: ProbeResult) -> None:
    """Put the probe's weights into the model's head."""
    linear = head_linear(model)
    linear.weight.copy_(probe.weight.to(linear.weight))
    linear.bias.copy_(probe.bias.to(linear.bias))
