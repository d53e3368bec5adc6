"""Golden values (worked out by hand in the comments) and gradient flow of kdpipe.training.losses."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.training import losses

LN3 = math.log(3.0)


def test_masked_ce_golden_and_mask():
    # sample 0: logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> CE = -ln(3/4) = ln(4/3)
    # sample 1: unlabeled (-1) -> ignored, even with extreme logits
    # sample 2: logits [0, 0] -> p = [1/2, 1/2]; label 0 -> CE = ln 2
    logits = torch.tensor([[0.0, LN3], [100.0, -100.0], [0.0, 0.0]])
    labels = torch.tensor([1, -1, 0])
    expected = (math.log(4 / 3) + math.log(2)) / 2  # mean over the 2 labeled samples
    assert losses.masked_ce(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_masked_ce_all_unlabeled_is_graph_zero():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = losses.masked_ce(logits, torch.full((4,), -1))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_kd_golden_tau1_and_tau2():
    # student [0, 0] -> ps = [1/2, 1/2]; teacher [0, ln 3] -> pt = [1/4, 3/4]
    # KL(pt||ps) = 1/4 ln(1/2) + 3/4 ln(3/2) = 3/4 ln 3 - ln 2
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, LN3]])
    assert losses.kd(s, t, tau=1.0).item() == pytest.approx(0.75 * LN3 - math.log(2), abs=1e-6)
    # tau = 2: teacher [0, 2 ln 3] / 2 -> again [1/4, 3/4]; student unchanged; factor tau^2 = 4
    t2 = torch.tensor([[0.0, 2 * LN3]])
    assert losses.kd(s, t2, tau=2.0).item() == pytest.approx(4 * (0.75 * LN3 - math.log(2)), abs=1e-5)


def test_kd_is_batch_mean_and_zero_for_equal():
    z = torch.randn(5, 4)
    assert losses.kd(z, z.clone(), tau=3.0).item() == pytest.approx(0.0, abs=1e-6)
    # two samples: one with the golden KL above, one identical -> batch mean = half of it
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[0.0, LN3], [1.0, 2.0]])
    assert losses.kd(s, t).item() == pytest.approx((0.75 * LN3 - math.log(2)) / 2, abs=1e-6)


def test_kd_gives_no_gradient_to_teacher():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    losses.kd(s, t, tau=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_dml_golden_symmetric():
    # pa = [1/2, 1/2], pb = [1/4, 3/4]
    # KL(pb||pa) = 3/4 ln 3 - ln 2                        (as in the kd test)
    # KL(pa||pb) = 1/2 ln(2) + 1/2 ln(2/3) = ln 2 - 1/2 ln 3
    # DML = 0.5 * (sum) = 0.5 * (1/4 ln 3) = ln 3 / 8
    za = torch.tensor([[0.0, 0.0]])
    zb = torch.tensor([[0.0, LN3]])
    assert losses.dml(za, zb).item() == pytest.approx(LN3 / 8, abs=1e-6)
    assert losses.dml(zb, za).item() == pytest.approx(LN3 / 8, abs=1e-6)


def test_dml_gives_gradients_to_both():
    za = torch.randn(3, 4, requires_grad=True)
    zb = torch.randn(3, 4, requires_grad=True)
    losses.dml(za, zb, tau=2.0).backward()
    assert za.grad is not None and za.grad.abs().sum() > 0
    assert zb.grad is not None and zb.grad.abs().sum() > 0


def test_pairwise_consistency_golden():
    # softmax: a -> [1/2, 1/2], b -> [1/4, 3/4], c -> [1/2, 1/2]
    # squared L2 distance (summed over the 2 classes): (a,b): (1/4)^2 + (1/4)^2 = 1/8; (a,c): 0; (b,c): 1/8
    # mean over the 3 pairs = (1/8 + 0 + 1/8) / 3 = 1/12
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[0.0, LN3]])
    c = torch.tensor([[5.0, 5.0]])
    assert losses.pairwise_consistency([a, b, c]).item() == pytest.approx(1 / 12, abs=1e-7)


def test_pairwise_consistency_sums_over_classes_and_averages_over_samples():
    # one sample with distance 1/8 (as above) and one with distance 0: the batch mean is 1/16, and the
    # value does not shrink with the number of classes (padding classes of -inf adds nothing)
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, LN3], [1.0, 2.0]])
    assert losses.pairwise_consistency([a, b]).item() == pytest.approx(1 / 16, abs=1e-7)
    pad = torch.full((2, 8), -1e9)
    wide = losses.pairwise_consistency([torch.cat([a, pad], 1), torch.cat([b, pad], 1)])
    assert wide.item() == pytest.approx(1 / 16, abs=1e-7)


def test_pairwise_consistency_identical_is_zero_else_positive_and_needs_two_views():
    z = torch.randn(6, 5)
    assert losses.pairwise_consistency([z, z.clone(), z.clone()]).item() == 0.0
    assert losses.pairwise_consistency([z, z + torch.randn(6, 5)]).item() > 0
    with pytest.raises(ValueError):
        losses.pairwise_consistency([z])


def test_pairwise_consistency_no_stop_gradient():
    views = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    losses.pairwise_consistency(views).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views)


def test_truth_loss_golden_with_threshold():
    # student logits [0, ln 3] -> ps = [1/4, 3/4] for every sample
    s = torch.tensor([[0.0, LN3]] * 3)
    # sample 0: labeled y=0                    -> CE = -ln(1/4) = ln 4
    # sample 1: unlabeled, teacher p=[.75,.25] -> conf 0.75 >= 0.7: pseudo 0 -> CE = ln 4
    # sample 2: unlabeled, teacher [0.1, 0]    -> conf ~0.525 < 0.7: dropped
    t = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.1, 0.0]])
    labels = torch.tensor([0, -1, -1])
    assert losses.truth_loss(s, t, labels, threshold=0.7).item() == pytest.approx(math.log(4), abs=1e-6)
    # threshold 0 keeps sample 2 too: argmax class 0 -> CE = ln 4; and make sample 1's target
    # class 1 instead by flipping its teacher: CE = -ln(3/4). Mean over the 3 used samples.
    t2 = torch.tensor([[0.0, 0.0], [0.0, LN3], [0.1, 0.0]])
    expected = (math.log(4) + math.log(4 / 3) + math.log(4)) / 3
    assert losses.truth_loss(s, t2, labels, threshold=0.0).item() == pytest.approx(expected, abs=1e-6)


def test_truth_loss_nothing_used_is_graph_zero_and_teacher_gets_no_grad():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.zeros(2, 3, requires_grad=True)  # confidence 1/3 everywhere
    loss = losses.truth_loss(s, t, torch.tensor([-1, -1]), threshold=0.9)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_feature_mse_golden_and_gradients():
    proj = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 2.0]]))
    fs = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)  # projected: [3], [2]
    ft = torch.tensor([[1.0], [2.0]], requires_grad=True)
    # errors 2 and 0 -> MSE = (4 + 0) / 2 = 2
    loss = losses.feature_mse(fs, ft, proj)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert fs.grad is not None and ft.grad is not None and proj.weight.grad is not None
    ft2 = ft.detach().clone().requires_grad_(True)
    losses.feature_mse(fs, ft2, proj, detach_teacher=True).backward()
    assert ft2.grad is None
