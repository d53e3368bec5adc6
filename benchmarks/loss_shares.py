"""How much each loss term of a recipe actually pushes the networks: gradient norm per term.

A weight of 1 says little: a term whose values are a hundred times smaller than the others' barely
trains anything. This measures, on the prepared data of ``make repro`` and at the settings of
params.yaml (with ``--recipe``, default ``full``), the norm of each weighted term's gradient with
respect to the student's parameters (and the teacher's, when the recipe trains it), at a few points
of a real training run, each averaged over a few batches. Shares are of the sum of the norms.

    .venv/bin/python -m benchmarks.loss_shares            # after make repro; about 2 minutes

For the consistency term it also reports the share it had when it was averaged over the classes as
well as the samples (its gradient divided by the number of classes): the reason it is now summed.
Results: benchmarks/results/loss_shares.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_description, markdown_table
from kdpipe.core.params import load_params

RESULTS = Path(__file__).resolve().parent / "results"


def gradient_norms(trainer, parameters: list[torch.nn.Parameter]) -> dict[str, float]:
    """Norm of each weighted term's gradient with respect to ``parameters`` on one fresh batch."""
    batch = trainer.next_batch()
    if trainer.schedule is not None:
        trainer.hyper.w = trainer.schedule.current()[2]
    with trainer.rt.autocast():
        out = trainer.nets.forward(batch)
    norms = {}
    for term in trainer.recipe.terms:
        weighted = term.fn(out, trainer.hyper, trainer.nets.projection) * term.weight_value(trainer.hyper)
        if not weighted.requires_grad:
            norms[term.name] = 0.0
            continue
        grads = torch.autograd.grad(weighted, parameters, retain_graph=True, allow_unused=True)
        norms[term.name] = math.sqrt(sum(float((g.float() ** 2).sum()) for g in grads if g is not None))
    return norms


def averaged(trainer, parameters, batches: int) -> dict[str, float]:
    runs = [gradient_norms(trainer, parameters) for _ in range(batches)]
    return {name: sum(r[name] for r in runs) / batches for name in runs[0]}


def shares(norms: dict[str, float]) -> dict[str, float]:
    total = sum(norms.values()) or 1.0
    return {name: value / total for name, value in norms.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="full")
    parser.add_argument("--at", default="0,50,150", help="iterations at which to measure")
    parser.add_argument("--batches", type=int, default=5, help="batches averaged per measurement")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from kdpipe.steps.distill import build_trainer

    checkpoints_at = sorted(int(x) for x in args.at.split(","))
    params = load_params(
        args.params, [f"train.recipe={args.recipe}", f"train.max_iterations={checkpoints_at[-1] + 1}"]
    )
    if not Path("artifacts/prepared/manifest.json").is_file():
        raise SystemExit("loss_shares: artifacts/prepared is missing: run `make repro` first")
    out_dir = Path("artifacts/bench-loss-shares")
    trainer = build_trainer(params, out_dir=out_dir, progress=False)
    trainer.nets.set_train_modes(trainer.iteration)
    num_classes = len(trainer.data.class_names)
    networks = {"student": [p for p in trainer.student.parameters() if p.requires_grad]}
    if trainer.recipe.trains_teacher:
        networks["teacher"] = [p for p in trainer.teacher.parameters() if p.requires_grad]
    rows, started = [], time.perf_counter()
    for target in checkpoints_at:
        while trainer.iteration < target:
            trainer.train_step()
        for network, parameters in networks.items():
            norms = averaged(trainer, parameters, args.batches)
            row = {"iteration": target, "network": network, "norms": norms, "shares": shares(norms)}
            if "cons" in norms and network == "student":
                old = {**norms, "cons": norms["cons"] / num_classes}
                row["cons_share_if_averaged_over_classes"] = shares(old)["cons"]
            rows.append(row)
            print(json.dumps(row))
    result = {
        "recipe": args.recipe,
        "classes": num_classes,
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": params.train.model_dump(
            include={
                "views",
                "mu",
                "tau",
                "mutual_tau",
                "w_labels",
                "w_consistency",
                "w_distill",
                "w_mutual",
                "batch_size",
            }
        ),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loss_shares.json").write_text(json.dumps(result, indent=2) + "\n")
    terms = list(rows[0]["norms"])
    table = markdown_table(
        ["iteration", "network", *[f"{t} share" for t in terms], "cons share if averaged over classes"],
        [
            [
                str(r["iteration"]),
                r["network"],
                *[f"{r['shares'][t]:.1%}" for t in terms],
                f"{r['cons_share_if_averaged_over_classes']:.1%}"
                if "cons_share_if_averaged_over_classes" in r
                else "",
            ]
            for r in rows
        ],
    )
    (RESULTS / "loss_shares.md").write_text(
        f"# Gradient share per loss term, recipe `{args.recipe}`\n\n"
        f"`.venv/bin/python -m benchmarks.loss_shares --recipe {args.recipe}` on {result['machine']}, "
        f"{result['date']} (demo data, params.yaml settings, {args.batches} batches per point).\n\n{table}\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
