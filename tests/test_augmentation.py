"""Batched augmentation: shapes, ranges, determinism, p semantics, per-sample randomness."""

from __future__ import annotations

import pytest
import torch
from host_reads import count_host_reads

from kdpipe.training import augmentation as aug
from kdpipe.training.augmentation import AugmentConfig, augment, make_generator, strong, weak


def _images(n=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _cfg(**kw):
    return AugmentConfig(**{**dict(pad=4, flip=True, num_ops=2, magnitude=0.5, erase_prob=0.5), **kw})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_shape_dtype_range(dtype, p):
    x = _images()
    if dtype != torch.uint8:
        x = x.to(dtype) / 255
    y = augment(x, make_generator(0), p, _cfg(magnitude=1.0))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_input_not_modified_and_grayscale_works():
    x = _images(c=1).float() / 255
    before = x.clone()
    y = augment(x, make_generator(0), 1.0, _cfg(magnitude=1.0, erase_prob=1.0))
    assert torch.equal(x, before) and y.shape == x.shape


def test_same_seed_same_output_different_seed_different_output():
    x = _images()
    a = augment(x, make_generator(7), 0.5, _cfg())
    b = augment(x, make_generator(7), 0.5, _cfg())
    c = augment(x, make_generator(8), 0.5, _cfg())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_p0_without_weak_ops_is_identity():
    x = _images()
    y = augment(x, make_generator(0), 0.0, _cfg(pad=0, flip=False, erase_prob=1.0, magnitude=1.0))
    assert torch.equal(y, x.float() / 255)


def test_p0_applies_only_weak_ops():
    # with p=0, augment must equal weak() drawn from the same generator state
    x = _images()
    y = augment(x, make_generator(3), 0.0, _cfg())
    assert torch.equal(y, weak(x, make_generator(3), pad=4, flip=True))


def test_weak_crop_is_a_shifted_window_of_the_padded_image():
    x = _images(n=32).float() / 255
    y = weak(x, make_generator(1), pad=2, flip=False)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        windows = [xp[i, :, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], win) for win in windows)
    offsets_used = {
        next(k for k in range(25) if torch.equal(y[i], xp[i, :, k // 5 : k // 5 + 32, k % 5 : k % 5 + 32]))
        for i in range(len(x))
    }
    assert len(offsets_used) > 5  # per-sample offsets, not one for the whole batch


def test_weak_flip_flips_some_samples():
    x = _images(n=64).float() / 255
    y = weak(x, make_generator(2), pad=0, flip=True)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


def test_p1_changes_every_sample():
    x = _images(n=64)
    cfg = _cfg(pad=0, flip=False, num_ops=3, magnitude=0.9, erase_prob=1.0)
    y = augment(x, make_generator(0), 1.0, cfg)
    base = x.float() / 255
    changed = (y - base).abs().flatten(1).amax(dim=1) > 1e-3
    assert bool(changed.all())


def test_strong_is_per_sample():
    # the same image repeated: the strong policy must treat copies differently
    x = _images(n=1).repeat(32, 1, 1, 1)
    y = strong(x, make_generator(0), num_ops=2, magnitude=0.8, erase_prob=0.0)
    distinct = {tuple(y[i].flatten()[::97].tolist()) for i in range(32)}
    assert len(distinct) > 8


def test_p_mixes_strong_and_weak_per_sample():
    x = _images(n=64)
    cfg = _cfg(pad=0, flip=False, num_ops=3, magnitude=0.9, erase_prob=1.0)
    y = augment(x, make_generator(5), 0.5, cfg)
    same = ((y - x.float() / 255).abs().flatten(1).amax(dim=1) == 0).sum().item()
    assert 10 < same < 54  # about half the samples untouched by the strong policy


@pytest.mark.parametrize("op", aug.OPS)
def test_each_op_runs_and_stays_in_range(op):
    # every sample draws `op`; low-contrast images (64..191) so autocontrast has work to do
    x = _images(n=8) // 2 + 64
    y = strong(x, make_generator(0), num_ops=1, magnitude=1.0, erase_prob=0.0, ops=(op,))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    if op == "identity":
        assert torch.equal(y, x.float() / 255)
    else:
        assert not torch.equal(y, x.float() / 255)


def test_magnitude_zero_is_identity():
    # brightness/contrast/... with factor 1, posterize 0 bits, rotate by 0, ...: (nearly) unchanged;
    # autocontrast has no magnitude, so it is left out here
    ops = tuple(o for o in aug.OPS if o != "autocontrast")
    x = _images(n=8)
    y = strong(x, make_generator(0), num_ops=2, magnitude=0.0, erase_prob=0.0, ops=ops)
    assert torch.allclose(y, x.float() / 255, atol=1e-5)


def test_unknown_op_rejected():
    with pytest.raises(ValueError):
        strong(_images(n=2), make_generator(0), ops=("blur",))


def test_from_params():
    from kdpipe.core.params import AugmentParams

    cfg = AugmentConfig.from_params(
        AugmentParams(pad=2, flip=False, num_ops=3, magnitude=0.2, erase_prob=0.1)
    )
    assert cfg == AugmentConfig(pad=2, flip=False, num_ops=3, magnitude=0.2, erase_prob=0.1)


# ------------------------------------------------------------------- host synchronisations


def test_host_read_counter_sees_the_usual_reads():
    t = torch.tensor([0, 2, 2, 1])
    assert count_host_reads(lambda: torch.bincount(t).tolist()) == 2
    assert count_host_reads(lambda: (t.nonzero(), t[t > 0], bool(t.any()), t.sum().item())) == 4
    assert count_host_reads(lambda: (t + 1, t.argsort(stable=True), t.index_select(0, t))) == 0


@pytest.mark.parametrize("num_ops", [1, 2, 4, 8])
@pytest.mark.parametrize("ops", [aug.OPS, ("contrast", "identity"), aug.GEOMETRIC_OPS])
def test_strong_reads_the_host_once_whatever_the_rounds(num_ops, ops):
    # one read for all the rounds' op counts and the warp (it was one per round plus one for the
    # warp, more on CUDA where bincount reads its input too): a GPU keeps its queue of kernels full
    x = _images(n=12)
    assert count_host_reads(lambda: strong(x, make_generator(0), num_ops=num_ops, ops=ops)) == 1
    assert count_host_reads(lambda: strong(x, make_generator(0), num_ops=0)) == 0


def test_augment_host_reads():
    # p == 1 selects every sample without reading the selection back; 0 < p < 1 has to read the
    # subset's size (it sets how many random numbers the strong policy draws)
    x = _images(n=12)
    assert count_host_reads(lambda: augment(x, make_generator(0), 0.0, _cfg(num_ops=3))) == 0
    assert count_host_reads(lambda: augment(x, make_generator(0), 1.0, _cfg(num_ops=3))) == 1
    assert count_host_reads(lambda: augment(x, make_generator(0), 0.5, _cfg(num_ops=3))) == 2


# ------------------------------------------------------------------- grouped and masked ways


def test_the_way_follows_the_device():
    assert aug.groups_on_host(torch.device("cpu"))
    assert not aug.groups_on_host(torch.device("cuda"))  # only the type is read: no GPU needed


@pytest.mark.parametrize("num_ops", [1, 2, 5])
@pytest.mark.parametrize(
    "ops", [aug.OPS, aug.COLOR_OPS, aug.GEOMETRIC_OPS, ("identity", "rotate", "solarize")]
)
def test_masked_strong_is_the_grouped_strong_without_host_reads(num_ops, ops):
    x = _images(n=40, seed=3)
    grouped = strong(x, make_generator(5), num_ops=num_ops, ops=ops, grouped=True)
    out = []
    assert (
        count_host_reads(
            lambda: out.append(strong(x, make_generator(5), num_ops=num_ops, ops=ops, grouped=False))
        )
        == 0
    )
    masked = out[0]
    assert torch.allclose(masked, grouped, atol=1e-5)
    assert not torch.allclose(masked, x.float() / 255, atol=1e-2)  # the policy did change the images


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_masked_augment_reads_nothing_back(p):
    x = _images(n=24)
    assert count_host_reads(lambda: augment(x, make_generator(0), p, _cfg(num_ops=3), grouped=False)) == 0


def test_masked_augment_keeps_the_strong_policy_for_the_selected_samples():
    x, cfg, p = _images(n=64, seed=4), _cfg(num_ops=2), 0.4
    out = augment(x, make_generator(9), p, cfg, grouped=False)
    # The same draws, step by step: weak on every sample, the selection, then strong on every sample.
    gen = make_generator(9)
    weak_views = weak(x, gen, pad=cfg.pad, flip=cfg.flip)
    selected = torch.rand(len(x), generator=gen) < p
    strong_views = strong(
        weak_views.clone(),
        gen,
        num_ops=cfg.num_ops,
        magnitude=cfg.magnitude,
        erase_prob=cfg.erase_prob,
        grouped=False,
    )
    assert 0 < int(selected.sum()) < len(x)
    assert torch.equal(out[~selected], weak_views[~selected])
    assert torch.equal(out[selected], strong_views[selected])
    assert torch.equal(out, augment(x, make_generator(9), p, cfg, grouped=False))  # deterministic
