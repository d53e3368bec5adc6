"""Distributed data parallel: two processes launched by torchrun run a distill recipe -- gloo on the
CPU here, and NCCL on two GPUs where a machine has them (the same tests, skipped otherwise).

Checks that the run completes, that only rank 0 writes the outputs, that the ranks agree on every
evaluation-driven decision, and the sampler contract: the ranks' batches are disjoint and together
form exactly the global batch a single process draws.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdpipe.core.atomic import read_json
from kdpipe.data.samplers import LabeledUnlabeledSampler
from kdpipe.training import checkpoints

pytestmark = pytest.mark.slow

WORLD = 2
ITERATIONS = 8

RANK_SCRIPT = """
import json, os, sys
from pathlib import Path

from kdpipe.training.engine import Trainer
from kdpipe.core.params import validate_params
from kdpipe.data.samplers import LabeledUnlabeledSampler
from kdpipe.steps import distill

cfg = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
rank = int(os.environ["RANK"])
record = Path(cfg["record_dir"])
draw = LabeledUnlabeledSampler.next

def logged_next(self):  # record the indices this rank's trainer really draws
    labeled, unlabeled = draw(self)
    with open(record / f"batches_rank{rank}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"iteration": self.iteration, "labeled": labeled.tolist(),
                            "unlabeled": unlabeled.tolist(), "rank": self.labeled.rank,
                            "world_size": self.labeled.world_size}) + "\\n")
    return labeled, unlabeled

write_reports = Trainer.write_reports

def logged_reports(self):  # every rank's own view of the run
    (record / f"history_rank{rank}.json").write_text(json.dumps(self.history))
    for name in ("student", "projection"):
        (record / f"{name}_rank{rank}.txt").write_text(
            repr(sorted((k, float(v.double().sum())) for k, v in getattr(self.nets, name).state_dict().items())))
    (record / f"gen_rank{rank}.json").write_text(json.dumps(self.gen.get_state().tolist()))
    return write_reports(self)

LabeledUnlabeledSampler.next = logged_next
if rank == 1:  # fault injection: rank 1's own evaluation disagrees with rank 0's
    import kdpipe.training.engine
    kdpipe.training.engine.accuracy = lambda logits, labels: 0.0
Trainer.write_reports = logged_reports
summary = distill.run(validate_params(cfg["params"]), **cfg["paths"])
(record / f"summary_rank{rank}.json").write_text(json.dumps(summary))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_batches(path):
    """The batches a rank's trainer drew, one per iteration. Batches are drawn ahead of the loop
    (kdpipe.data.prefetch): the ones dropped at a checkpoint are drawn again, identical, and the last
    ones drawn may never be used, so each iteration is kept once."""
    by_iteration = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        batch = json.loads(line)
        assert by_iteration.setdefault(batch["iteration"], batch) == batch, "a redrawn batch differs"
    return [by_iteration[i] for i in sorted(by_iteration)][:ITERATIONS]


BACKENDS = [
    pytest.param("cpu", id="gloo-cpu"),
    pytest.param(
        "cuda",
        id="nccl-cuda",
        marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"NCCL needs {WORLD} CUDA GPUs"),
    ),
]


@pytest.fixture(scope="module", params=BACKENDS)
def ddp_run(request, tiny_pipeline_dirs, tiny_params_factory, tmp_path_factory):
    """train.device picks the backend: cuda -> NCCL, one GPU per rank (devices.py); cpu -> gloo."""
    d = tiny_pipeline_dirs
    base = tmp_path_factory.mktemp("ddp")
    out, record = base / "distill", base / "record"
    record.mkdir()
    # w_features > 0: the learned feature projection is trained too and must stay in sync across ranks
    params = tiny_params_factory(
        recipe="cotrain",
        max_iterations=ITERATIONS,
        eval_every=4,
        epoch_iterations=4,
        checkpoint_every=4,
        threads=1,
        w_features=0.5,
        device=request.param,
        amp="off",
    )
    cfg = base / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "params": params.model_dump(mode="json"),
                "record_dir": str(record),
                "paths": {
                    "prepared_dir": str(d["prepared"]),
                    "augmented_dir": str(d["augmented"]),
                    "teacher_dir": str(d["teacher"]),
                    "out_dir": str(out),
                },
            }
        )
    )
    script = base / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
        str(cfg),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=base)
    except subprocess.TimeoutExpired as exc:  # torchrun kills its workers when it is killed
        pytest.fail(f"DDP run did not finish in 180 s:\n{exc.stdout}\n{exc.stderr}")
    return {"proc": proc, "out": out, "record": record, "params": params, "dirs": d}


def test_ddp_run_completes_and_rank0_writes_outputs(ddp_run):
    proc, out, record = ddp_run["proc"], ddp_run["out"], ddp_run["record"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in range(WORLD):
        summary = read_json(record / f"summary_rank{rank}.json")
        assert summary["iterations"] == ITERATIONS and summary["recipe"] == "cotrain"
    assert {"student.pt", "teacher.pt", "last.pt", "history.json", "metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    metrics = read_json(out / "metrics.json")
    assert metrics["iterations"] == ITERATIONS
    last = checkpoints.load(out / "last.pt")
    assert last["iteration"] == ITERATIONS
    assert last["sampler"]["labeled"]["world_size"] == WORLD
    assert last["projection"] is not None and "loss_feat" in read_json(out / "history.json")[0]
    # only rank 0 reports: one summary line, and the history file is rank 0's history
    assert proc.stdout.count("distill: recipe=cotrain") == 1
    assert read_json(out / "history.json") == read_json(record / "history_rank0.json")


def test_ddp_ranks_stay_in_sync(ddp_run):
    record = ddp_run["record"]
    assert ddp_run["proc"].returncode == 0
    # DDP averages gradients: both ranks end with the same weights (BatchNorm statistics are
    # rank-local between forwards, which is why the ranks must not decide on their own evaluations) ...
    states = [dict(ast.literal_eval((record / f"student_rank{r}.txt").read_text())) for r in range(WORLD)]
    params = [k for k in states[0] if not k.endswith(("running_mean", "running_var"))]
    assert {k: states[0][k] for k in params} == {k: states[1][k] for k in params}
    projections = [(record / f"projection_rank{r}.txt").read_text() for r in range(WORLD)]
    assert projections[0] == projections[1]
    # ... and every evaluation-driven decision (best checkpoint, schedule, early stop) sees the same
    # record, rank 0's, even though rank 1's own evaluation (forced to 0 in RANK_SCRIPT) disagrees
    strip = [
        [
            {k: v for k, v in h.items() if k not in ("train_seconds", "lr") and not k.startswith("loss_")}
            for h in read_json(record / f"history_rank{r}.json")
        ]
        for r in range(WORLD)
    ]
    assert strip[0] == strip[1]
    assert [h["iteration"] for h in strip[0]] == [4, 8]
    assert strip[0] == [
        {k: v for k, v in h.items() if k in strip[0][0]} for h in read_json(ddp_run["out"] / "history.json")
    ]
    assert max(h["val_acc_teacher"] for h in strip[1]) > 0.0  # not rank 1's injected zeros


def test_ddp_sampler_batches_are_disjoint_and_form_the_global_batch(ddp_run):
    record, params, d = ddp_run["record"], ddp_run["params"], ddp_run["dirs"]
    assert ddp_run["proc"].returncode == 0
    per_rank = [_read_batches(record / f"batches_rank{r}.jsonl") for r in range(WORLD)]
    assert all(len(batches) == ITERATIONS for batches in per_rank)
    assert all(b["rank"] == r and b["world_size"] == WORLD for r in range(WORLD) for b in per_rank[r])

    n_labeled = len(np.load(d["prepared"] / "train_x.npy", mmap_mode="r"))
    n_unlabeled = len(np.load(d["prepared"] / "unlabeled_x.npy", mmap_mode="r"))
    tp = params.train
    assert (
        n_labeled >= tp.batch_size * WORLD and n_unlabeled >= tp.batch_size * WORLD
    )  # distinct-index regime
    single = LabeledUnlabeledSampler(n_labeled, n_unlabeled, tp.batch_size * WORLD, tp.mu, tp.seed)
    for step in range(ITERATIONS):
        global_l, global_u = single.next()
        for key, global_batch in (("labeled", global_l), ("unlabeled", global_u)):
            batches = [per_rank[r][step][key] for r in range(WORLD)]
            assert all(len(b) == tp.batch_size for b in batches)
            assert not set(batches[0]) & set(batches[1]), f"step {step}: ranks share {key} samples"
            assert sorted(batches[0] + batches[1]) == sorted(global_batch.tolist())
            # rank r takes every WORLD-th sample of the global batch, in order
            for r in range(WORLD):
                assert batches[r] == global_batch[r::WORLD].tolist()


def test_ddp_resume_state_is_usable_by_a_single_process_run(ddp_run):
    """last.pt written by rank 0 holds plain (unwrapped) weights that load into a fresh network."""
    from kdpipe.training.models import build_model

    last = checkpoints.load(ddp_run["out"] / "last.pt")
    assert not any(k.startswith("module.") for k in last["student"])
    model = build_model("cnn_tiny", 3, 16)
    model.load_state_dict(last["student"])
    best, _ = checkpoints.load_model(ddp_run["out"] / "student.pt")
    assert isinstance(best, torch.nn.Module)


def test_ddp_resume_state_keeps_every_ranks_own_random_streams(ddp_run):
    """Each rank augments with its own generator; the resume state must give each rank back its own
    (it used to hold rank 0's only, so after a resume every rank drew rank 0's augmentations)."""
    record = ddp_run["record"]
    rng = checkpoints.load(ddp_run["out"] / "last.pt")["rng"]
    assert len(rng) == WORLD
    for rank in range(WORLD):
        assert rng[rank]["gen"].tolist() == read_json(record / f"gen_rank{rank}.json")
    assert rng[0]["gen"].tolist() != rng[1]["gen"].tolist()
