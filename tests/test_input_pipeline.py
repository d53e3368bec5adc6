"""The training input pipeline (kdpipe.data.prefetch, kdpipe.training.views): one host copy per batch, equal to the
previous assembly byte for byte; batches drawn ahead in a thread give the very same run, resume
bit-exactly, and the thread never outlives the loop (normal end, early stop, exception)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from host_reads import count_host_reads

from kdpipe.data.prefetch import THREAD_NAME, BatchStream
from kdpipe.training import checkpoints
from kdpipe.training.devices import Runtime
from kdpipe.training.views import gather_batch, gathers_channels_first, nchw_on_device, to_nchw

CPU_RUNTIME = Runtime(torch.device("cpu"), None, False)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture
def memmapped(tmp_path):
    """Two memory-mapped uint8 image arrays (labeled, unlabeled) and stored views (N, K, H, W, 3)."""
    rng = np.random.default_rng(0)
    arrays = {
        "labeled": (40, 6, 6, 3),
        "unlabeled": (30, 6, 6, 3),
        "labeled_views": (40, 3, 6, 6, 3),
        "unlabeled_views": (30, 3, 6, 6, 3),
    }
    out = {}
    for name, shape in arrays.items():
        np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, shape, dtype=np.uint8))
        out[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    return out


# ------------------------------------------------------------------------------ one copy, same bytes
def _old_assembly(labeled, unlabeled, l_idx, u_idx) -> torch.Tensor:
    """views.py before the prefetcher: fancy index, concatenate, np.array, permute on the host."""
    return to_nchw(np.concatenate([labeled[l_idx], unlabeled[u_idx] if len(u_idx) else labeled[:0]]))


@pytest.mark.parametrize("channels_first", [True, False], ids=["nchw-gather", "nhwc-gather"])
@pytest.mark.parametrize(
    ("l_idx", "u_idx"),
    [
        ([7, 3, 39, 0, 12], [29, 1, 15]),  # unsorted
        ([5, 5, 2, 5, 2], [4, 4, 4]),  # repeats (a small labeled set cycles inside one batch)
        ([9, 1, 30], []),  # no unlabeled samples
    ],
    ids=["unsorted", "repeats", "no-unlabeled"],
)
def test_one_copy_assembly_equals_the_old_one(memmapped, l_idx, u_idx, channels_first):
    """Both layouts: gathered as NCHW (a CPU device) and as NHWC, permuted on the device (a GPU)."""
    l_idx, u_idx = np.array(l_idx, dtype=np.int64), np.array(u_idx, dtype=np.int64)
    labeled, unlabeled = memmapped["labeled"], memmapped["unlabeled"]
    host = gather_batch(labeled, unlabeled, (l_idx,), (u_idx,), CPU_RUNTIME, channels_first)
    old = _old_assembly(labeled, unlabeled, l_idx, u_idx)
    new = host if channels_first else host.permute(0, 3, 1, 2).contiguous()
    assert new.dtype == old.dtype == torch.uint8 and new.shape == old.shape and new.is_contiguous()
    assert torch.equal(new, old)


def test_stored_view_assembly_equals_the_old_one(memmapped):
    l_idx, u_idx = np.array([11, 2, 2, 37], dtype=np.int64), np.array([0, 28, 0], dtype=np.int64)
    pick = np.array([2, 0, 1, 2, 1, 0, 1], dtype=np.int64)
    views, u_views = memmapped["labeled_views"], memmapped["unlabeled_views"]
    host = gather_batch(
        views, u_views, (l_idx, pick[:4]), (u_idx, pick[4:]), CPU_RUNTIME, gathers_channels_first(CPU_RUNTIME)
    )
    old = to_nchw(np.concatenate([views[l_idx, pick[:4]], u_views[u_idx, pick[4:]]]))
    new = nchw_on_device(host, CPU_RUNTIME)
    assert new.is_contiguous() and torch.equal(new, old)


# ------------------------------------------------------------------------------ the trainer
@pytest.fixture
def trainer_for(tiny_pipeline_dirs, tiny_params_factory, tmp_path):
    """``trainer_for(name, prefetch=2, **train_overrides)``: a distill trainer on the tiny pipeline,
    in its own folder (torch's thread count is restored afterwards)."""
    from kdpipe.steps import distill

    threads = torch.get_num_threads()
    d = tiny_pipeline_dirs

    def build(name, prefetch=2, **overrides):
        params = tiny_params_factory(
            **{
                "max_iterations": 16,
                "epoch_iterations": 4,
                "eval_every": 4,
                "checkpoint_every": 3,
                **overrides,
            }
        )
        trainer = distill.build_trainer(
            params, d["prepared"], d["augmented"], d["teacher"], tmp_path / name, progress=False
        )
        trainer.batches.depth = prefetch
        return trainer

    yield build
    torch.set_num_threads(threads)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


# "full" augments online (device generator on the training thread); "full" with a frozen teacher
# chooses among stored views with the schedule's probabilities, which change at every epoch's end.
SETUPS = {"online": {"recipe": "full"}, "stored": {"recipe": "full", "teacher_trainable": False}}


@pytest.mark.parametrize("setup", SETUPS)
def test_prefetched_run_is_the_run_without_prefetch(setup, trainer_for):
    runs = {}
    for depth in (0, 2):
        trainer = trainer_for(f"depth{depth}", prefetch=depth, **SETUPS[setup])
        trainer.run()
        runs[depth] = trainer
    assert _without_timing(runs[0].history) == _without_timing(runs[2].history)
    assert len({h["p1"] for h in runs[2].history}) > 1  # the schedule moved during the run
    a, b = _weights(runs[0]), _weights(runs[2])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not _prefetch_threads()


class Interrupted(Exception):
    pass


def _fail_at(trainer, iteration: int) -> None:
    """Make the trainer's loop raise once it has taken ``iteration`` steps (after that step's checkpoint)."""
    save = trainer.save_last

    def save_then_fail():
        save()
        if trainer.iteration >= iteration:
            raise Interrupted

    trainer.save_last = save_then_fail


@pytest.mark.parametrize("setup", SETUPS)
def test_interrupted_prefetched_run_resumes_bit_for_bit(setup, trainer_for):
    """An exception in the loop stops the prefetch thread; the checkpoint it left holds the streams
    of the last consumed batch, so the resumed run ends exactly where an uninterrupted one does."""
    first = trainer_for("resumed", **SETUPS[setup])
    _fail_at(first, 9)
    with pytest.raises(Interrupted):
        first.run()
    assert not _prefetch_threads()
    assert checkpoints.load(first.out_dir / "last.pt")["iteration"] == 9

    resumed = trainer_for("resumed", **SETUPS[setup])
    assert resumed.try_resume() and resumed.iteration == 9
    resumed.run()
    reference = trainer_for("reference", **SETUPS[setup])
    reference.run()
    a, b = _weights(resumed), _weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _without_timing(resumed.history) == _without_timing(reference.history)
    saved = [checkpoints.load(t.out_dir / "last.pt") for t in (resumed, reference)]
    assert saved[0]["sampler"] == saved[1]["sampler"]
    assert torch.equal(saved[0]["rng"][0]["gen"], saved[1]["rng"][0]["gen"])
    if setup == "stored":
        assert torch.equal(saved[0]["rng"][0]["views"]["gen"], saved[1]["rng"][0]["views"]["gen"])
    assert not _prefetch_threads()


def test_early_stop_leaves_no_prefetch_thread(trainer_for):
    trainer = trainer_for("early", recipe="kd", target_metric=0.0)  # reached at the first evaluation
    summary = trainer.run()
    assert summary["iterations"] == 4 and "target_metric" in summary["stop_reason"]
    assert not _prefetch_threads()


# ------------------------------------------------------------------------------ host synchronisations
# Every recipe family: online views with a trained teacher (full, cotrain), stored views with cached
# logits (kd), the schedule choosing among stored views (full with a frozen teacher).
SYNC_SETUPS = {
    "full": {"recipe": "full"},
    "cotrain": {"recipe": "cotrain"},
    "kd": {"recipe": "kd"},
    "full_stored": {"recipe": "full", "teacher_trainable": False},
}


@pytest.mark.parametrize("setup", SYNC_SETUPS)
def test_a_training_step_reads_nothing_back_on_an_accelerator(setup, trainer_for, monkeypatch):
    # The device work of a step (the views made on the device, forward, losses, backward, optimiser
    # steps, the running loss sums) with augmentation run as on a GPU (masked): no host read, so the
    # GPU's queue of kernels never drains between steps. The batch's host part (sampling, gathering)
    # runs in the prefetch thread and only touches host memory, so it is drawn outside the count.
    from kdpipe.training import augmentation

    monkeypatch.setattr(augmentation, "groups_on_host", lambda device: False)
    trainer = trainer_for(f"sync-{setup}", prefetch=0, **SYNC_SETUPS[setup])
    views, sampler = trainer.batches.views, trainer.batches.sampler
    for _ in range(3):
        host = views.host(*sampler.next(), views.draw_key())
        trainer.next_batch = lambda host=host: views.on_device(host)
        assert count_host_reads(trainer.train_step) == 0
    assert all(torch.isfinite(v) for v in trainer.running.values())  # the steps did train


# ------------------------------------------------------------------------------ the stream itself
class CountingSampler:
    """The sampler's interface: successive index batches, and its state."""

    def __init__(self):
        self.position = 0

    def next(self):
        self.position += 1
        return np.array([self.position]), np.empty(0, dtype=np.int64)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class EchoViews:
    """The views' interface: the batch is the sampler's index; fails on ``fail_at``."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def draw_key(self):
        return None

    def host(self, l_idx, u_idx, key):
        if int(l_idx[0]) == self.fail_at:
            raise ValueError(f"cannot read sample {self.fail_at}")
        return int(l_idx[0])

    def on_device(self, host):
        return host


def test_stream_puts_the_sampler_back_to_the_last_consumed_batch():
    sampler = CountingSampler()
    stream = BatchStream(sampler, EchoViews(), depth=3)
    with stream.prefetching():
        assert [stream.next() for _ in range(4)] == [1, 2, 3, 4]
        stream.stop()  # what a checkpoint does
        assert sampler.position == 4 and not _prefetch_threads()
        assert stream.next() == 5  # the thread restarts where the loop is
    assert sampler.position == 5 and not _prefetch_threads()


def test_an_error_in_the_thread_is_raised_on_the_training_thread():
    sampler = CountingSampler()
    stream = BatchStream(sampler, EchoViews(fail_at=3), depth=2)
    with pytest.raises(ValueError, match="cannot read sample 3"), stream.prefetching():
        while True:
            stream.next()
    assert sampler.position == 2  # the two batches consumed
    assert not _prefetch_threads()
