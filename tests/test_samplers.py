"""Endless samplers: sizes, determinism, exact resume, DDP sharding guarantees, cycling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdpipe.data.samplers import EndlessSampler, LabeledUnlabeledSampler, unlabeled_batch_size


def _take(sampler, k):
    return [sampler.next() for _ in range(k)]


def test_batch_sizes_and_dtype():
    s = EndlessSampler(n=100, batch_size=32, seed=0)
    for b in _take(s, 10):
        assert b.shape == (32,) and b.dtype == np.int64
        assert b.min() >= 0 and b.max() < 100


def test_deterministic_and_seed_dependent():
    a = _take(EndlessSampler(50, 8, seed=3), 20)
    b = _take(EndlessSampler(50, 8, seed=3), 20)
    c = _take(EndlessSampler(50, 8, seed=4), 20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_epochs_are_fresh_permutations_without_repeats():
    # n=100, batch 25: 4 batches per epoch cover all 100 indices exactly once, epochs differ
    s = EndlessSampler(100, 25, seed=0)
    e0 = np.concatenate(_take(s, 4))
    e1 = np.concatenate(_take(s, 4))
    assert sorted(e0) == list(range(100)) and sorted(e1) == list(range(100))
    assert not np.array_equal(e0, e1)


def test_remainder_is_dropped_so_batches_hold_distinct_indices():
    # n=10, batch 4: 2 batches per epoch (8 distinct indices), 2 random ones skipped
    s = EndlessSampler(10, 4, seed=1)
    for _ in range(5):
        epoch = np.concatenate(_take(s, 2))
        assert len(set(epoch.tolist())) == 8
    assert s.state_dict()["epoch"] == 5 and s.state_dict()["position"] == 0


def test_small_set_cycles_and_batches_stay_full():
    s = EndlessSampler(n=5, batch_size=12, seed=0)
    stream = np.concatenate(_take(s, 5))  # 60 draws = 12 whole permutations of 5
    assert all(len(b) == 12 for b in _take(EndlessSampler(5, 12, seed=0), 3))
    counts = np.bincount(stream, minlength=5)
    assert counts.tolist() == [12] * 5
    for k in range(12):
        assert sorted(stream[5 * k : 5 * k + 5]) == list(range(5))


@pytest.mark.parametrize("n,batch,k", [(100, 7, 23), (5, 12, 4), (64, 16, 4), (1, 3, 2)])
def test_resume_equals_uninterrupted(n, batch, k):
    full = _take(EndlessSampler(n, batch, seed=9), k + 10)
    first = EndlessSampler(n, batch, seed=9)
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must be JSON-able
    resumed = EndlessSampler(n, batch, seed=9)
    resumed.load_state_dict(state)
    rest = _take(resumed, 10)
    assert all(np.array_equal(x, y) for x, y in zip(full[k:], rest, strict=True))


def test_load_state_rejects_mismatch():
    state = EndlessSampler(100, 8, seed=0).state_dict()
    with pytest.raises(ValueError):
        EndlessSampler(101, 8, seed=0).load_state_dict(state)
    with pytest.raises(ValueError):
        EndlessSampler(100, 8, seed=1).load_state_dict(state)


@pytest.mark.parametrize("n", [103, 40, 7])
def test_rank_shards(n):
    """Guarantee: at every step the ranks' batches are disjoint stream positions whose union is the
    single-process batch of size batch_size * world_size (distinct indices when n >= that size)."""
    world, batch = 4, 5
    ranks = [EndlessSampler(n, batch, seed=2, rank=r, world_size=world) for r in range(world)]
    single = EndlessSampler(n, batch * world, seed=2)
    for _ in range(12):
        shards = [r.next() for r in ranks]
        whole = single.next()
        assert all(len(s) == batch for s in shards)
        assert sorted(np.concatenate(shards).tolist()) == sorted(whole.tolist())
        for r in range(world):
            assert np.array_equal(shards[r], whole[r::world])
        if n >= batch * world:
            assert len(set(np.concatenate(shards).tolist())) == batch * world
    # every rank holds the same (global) state, so one checkpoint resumes all ranks
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)


def test_state_of_rank0_resumes_other_rank():
    a = EndlessSampler(50, 4, seed=0, rank=1, world_size=2)
    r0 = EndlessSampler(50, 4, seed=0, rank=0, world_size=2)
    _take(a, 3)
    _take(r0, 3)
    b = EndlessSampler(50, 4, seed=0, rank=1, world_size=2)
    b.load_state_dict(r0.state_dict())
    assert all(np.array_equal(x, y) for x, y in zip(_take(a, 5), _take(b, 5), strict=True))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        EndlessSampler(0, 4)
    with pytest.raises(ValueError):
        EndlessSampler(10, 4, rank=2, world_size=2)


def test_unlabeled_batch_size_rounding():
    assert unlabeled_batch_size(64, 1.0) == 64
    assert unlabeled_batch_size(5, 0.5) == 3  # 2.5 rounds up
    assert unlabeled_batch_size(7, 7.0) == 49
    assert unlabeled_batch_size(8, 0.0) == 0


def test_labeled_unlabeled_sizes_and_iteration():
    s = LabeledUnlabeledSampler(n_labeled=10, n_unlabeled=1000, batch_size=8, mu=2.0, seed=0)
    for i in range(5):
        lab, unl = s.next()
        assert lab.shape == (8,) and unl.shape == (16,)
        assert lab.max() < 10 and unl.max() < 1000
        assert s.iteration == i + 1


@pytest.mark.parametrize("n_unlabeled,mu", [(0, 1.0), (100, 0.0)])
def test_no_unlabeled(n_unlabeled, mu):
    s = LabeledUnlabeledSampler(20, n_unlabeled, batch_size=4, mu=mu, seed=0)
    lab, unl = s.next()
    assert lab.shape == (4,) and unl.shape == (0,) and unl.dtype == np.int64
    state = json.loads(json.dumps(s.state_dict()))
    t = LabeledUnlabeledSampler(20, n_unlabeled, batch_size=4, mu=mu, seed=0)
    t.load_state_dict(state)
    assert np.array_equal(s.next()[0], t.next()[0])


def test_labeled_and_unlabeled_streams_are_independent():
    # same n and batch: with the same seed they must still not be the same stream
    s = LabeledUnlabeledSampler(50, 50, batch_size=10, mu=1.0, seed=0)
    pairs = _take(s, 5)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_labeled_unlabeled_resume_equals_uninterrupted():
    args = dict(n_labeled=7, n_unlabeled=300, batch_size=4, mu=3.0, seed=11)
    full = _take(LabeledUnlabeledSampler(**args), 20)
    first = LabeledUnlabeledSampler(**args)
    _take(first, 8)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = LabeledUnlabeledSampler(**args)
    resumed.load_state_dict(state)
    assert resumed.iteration == 8
    for (la, ua), (lb, ub) in zip(full[8:], _take(resumed, 12), strict=True):
        assert np.array_equal(la, lb) and np.array_equal(ua, ub)
    assert resumed.iteration == 20
