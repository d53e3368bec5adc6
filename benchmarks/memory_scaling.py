"""Peak memory of prepare, augment and distill as the data set grows (32 px images).

Each step runs as its own ``kdpipe`` child process, on a synthetic folder of N small JPEGs (1,000
labeled in 10 classes, 200 test, the rest unlabeled), with small settings so that the time goes
into handling the data, not into training: augment with 2 views, distill with 50 iterations of
recipe ``kd``. One tiny teacher (cnn_tiny, 20 iterations) is trained once, on the smallest N, and
adopted at every N (``teacher.checkpoint``; the classes are the same).

Two figures per step:

- peak RSS: the largest resident set of any process of the step (``ru_maxrss`` of the reaped child,
  exact). It counts the pages of memory-mapped files the step has touched, which the kernel can
  drop at any time, so a step that streams through a memory-mapped array shows it growing.
  The step is started by a small launcher (``python -S``), not by this script directly: Linux
  carries the high-water mark of the address space a process is started from into the new
  program's ``ru_maxrss`` (``exec`` records it, and Python starts children with ``vfork``), so
  a step started from this script would report this script's own peak whenever it is larger
  (listing the 200k-image folder took it to 127 MiB; prepare's own peak is about 72 MiB);
- peak anonymous memory: the step's process tree's proportional anonymous memory (``Pss_Anon``
  of every process, summed; sampled every 0.2 s, so it may miss short peaks): the memory that
  cannot be given back, counting worker processes too.

Goal (issue 17): flat in N, the largest N within 20% of the smallest.

    .venv/bin/python -m benchmarks.memory_scaling                 # N = 10k, 50k
    .venv/bin/python -m benchmarks.memory_scaling --large         # N = 10k, 50k, 200k
    .venv/bin/python -m benchmarks.memory_scaling --n 2000 --n 5000 --out benchmarks/results/memory_scaling_smoke

The folder grows in place: it is generated for the smallest N, and each larger N adds a batch of
unlabeled images (as ``kdpipe ingest`` would). Everything lives in a temporary folder (the
repository's data/ and artifacts/ are never touched). Results: benchmarks/results/memory_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import markdown_table, provenance, write_results
from benchmarks.synthetic_images import THUMBNAIL_SIZES, add_unlabeled_batch, generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK_N = (10_000, 50_000)
LARGE_N = 200_000
LABELED, TEST, CLASSES = 1000, 200, 10
STEPS = ("prepare", "augment", "distill")
GOAL_FLAT = 1.2

# Small settings: every step touches every image, none trains for long.
PARAMS_YAML = """\
prepare:
  image_size: 32
augment:
  views: 2
teacher:
  arch: cnn_tiny
  weights: null
  image_size: null
  max_iterations: 20
  eval_every: 20
train:
  recipe: kd
  max_iterations: 50
  eval_every: 50
  checkpoint_every: 50
"""


# ------------------------------------------------------------------ measuring one child


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces


def _tree(root: int) -> list[int]:
    """``root`` and its descendants now (a scan of /proc: no kernel child lists here)."""
    parents = {int(p): _ppid(p) for p in os.listdir("/proc") if p.isdigit()}
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _pss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class AnonSampler(threading.Thread):
    """Samples the summed ``Pss_Anon`` of a process tree until stopped; keeps the peak.
    ``skip_root``: count only the descendants (the root is the launcher, not the step)."""

    def __init__(self, pid: int, interval: float = 0.2, skip_root: bool = False):
        super().__init__(daemon=True)
        self.pid, self.interval, self.skip_root = pid, interval, skip_root
        self.peak_kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _tree(self.pid)[1 if self.skip_root else 0 :]
            self.peak_kib = max(self.peak_kib, sum(_pss_anon_kib(p) for p in pids))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


# Runs argv[2:] as its child and writes the child's peak RSS (KiB, from wait4) to the file argv[1];
# exits with the child's exit status. Started with -S (no site packages), so the address space the
# step is started from is a few MiB.
_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict:
    """Run one step as a child of the launcher; its peak RSS (from the kernel, when it is reaped),
    the sampled peak anonymous memory of its process tree, and its wall time."""
    start = time.perf_counter()
    peak_file = log.with_suffix(".maxrss")
    with log.open("w") as out:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(peak_file), *cmd]
        proc = subprocess.Popen(launcher, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = AnonSampler(proc.pid, skip_root=True)
        sampler.start()
        proc.wait()
        sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    peak_rss_kib = int(peak_file.read_text())
    return {
        "peak_rss_mib": round(peak_rss_kib / 1024, 1),
        "peak_anon_mib": round(sampler.peak_kib / 1024, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


# ------------------------------------------------------------------ the pipeline at one N


class Workspace:
    """The temporary folder: the growing data root, a params file, per-N outputs and logs."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.params = root / "params.yaml"
        self.params.write_text(PARAMS_YAML)
        self.teacher_once = root / "teacher-once"
        self.env = {**os.environ, "KDPIPE_TRACKING": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("KDPIPE_PARAMS", None)

    def kdpipe(self, step: str, *args: str) -> list[str]:
        return [str(BIN / "kdpipe"), step, "--params", str(self.params), *args]

    def grow_to(self, n: int) -> float:
        """Make the data root hold ``n`` images (generate, or add an unlabeled batch); returns seconds."""
        start = time.perf_counter()
        if not self.data.exists():
            summary = generate(
                self.data,
                labeled=LABELED,
                unlabeled=n - LABELED - TEST,
                test=TEST,
                classes=CLASSES,
                sizes=THUMBNAIL_SIZES,
                seed=0,
            )
            print(f"generated {summary.line()}", flush=True)
        else:
            have = sum(1 for _ in self.data.rglob("*.jpg"))
            add_unlabeled_batch(self.data, n - have)
        return time.perf_counter() - start

    def steps_at(self, n: int) -> dict[str, dict]:
        """prepare, augment and distill on the data as it is now (``n`` images)."""
        folder = self.root / f"n{n}"
        folder.mkdir()
        env = {**self.env, "KDPIPE_CACHE_DIR": str(folder / "cache")}  # a full prepare: nothing cached
        prepared, teacher = folder / "prepared", folder / "teacher"
        measured = {
            "prepare": run_measured(
                self.kdpipe("prepare", "--data-root", str(self.data), "--out-dir", str(prepared)),
                folder,
                env,
                folder / "prepare.log",
            )
        }
        if not (self.teacher_once / "teacher.pt").exists():
            run_measured(
                self.kdpipe("teacher", "--prepared-dir", str(prepared), "--out-dir", str(self.teacher_once)),
                folder,
                env,
                folder / "teacher-once.log",
            )
        # The teacher trained once, adopted for this N's data (no training: a copy and an evaluation).
        run_measured(
            self.kdpipe(
                "teacher",
                "-S",
                f"teacher.checkpoint={self.teacher_once / 'teacher.pt'}",
                "--prepared-dir",
                str(prepared),
                "--out-dir",
                str(teacher),
            ),
            folder,
            env,
            folder / "teacher.log",
        )
        measured["augment"] = run_measured(
            self.kdpipe(
                "augment",
                "--prepared-dir",
                str(prepared),
                "--teacher-dir",
                str(teacher),
                "--out-dir",
                str(folder / "augmented"),
            ),
            folder,
            env,
            folder / "augment.log",
        )
        measured["distill"] = run_measured(
            self.kdpipe(
                "distill",
                "--prepared-dir",
                str(prepared),
                "--augmented-dir",
                str(folder / "augmented"),
                "--teacher-dir",
                str(teacher),
                "--out-dir",
                str(folder / "distill"),
            ),
            folder,
            env,
            folder / "distill.log",
        )
        for output in (prepared, teacher, folder / "augmented", folder / "distill", folder / "cache"):
            shutil.rmtree(output, ignore_errors=True)  # GBs at 200k images; the logs stay (see --keep)
        return measured


# ------------------------------------------------------------------ report


def ratios(table: dict[int, dict[str, dict]], key: str) -> dict[str, float]:
    """Per step: the figure at the largest N over the one at the smallest."""
    low, high = min(table), max(table)
    return {step: table[high][step][key] / table[low][step][key] for step in STEPS}


def render(result: dict) -> str:
    table = {int(n): steps for n, steps in result["table"].items()}
    ns = sorted(table)
    low, high = ns[0], ns[-1]
    header = ["step", *(f"N={n:,}" for n in ns), f"{high:,}/{low:,}"]
    rss_rows = [
        [step, *(f"{table[n][step]['peak_rss_mib']:.0f}" for n in ns), f"{result['rss_ratio'][step]:.2f}"]
        for step in STEPS
    ]
    anon_rows = [
        [step, *(f"{table[n][step]['peak_anon_mib']:.0f}" for n in ns), f"{result['anon_ratio'][step]:.2f}"]
        for step in STEPS
    ]
    time_rows = [[step, *(f"{table[n][step]['seconds']:.0f}" for n in ns)] for step in STEPS]
    flat = all(r <= GOAL_FLAT for r in result["rss_ratio"].values())
    smoke = result["smoke"]
    return (
        "\n".join(
            [
                *(
                    ["**SMOKE RUN (small N, checks that the benchmark works; not a measurement)**", ""]
                    if smoke
                    else []
                ),
                f"Command: `{result['command']}`",
                f"Machine: {result['cpu']}; {result['date']}; kdpipe {result['commit']}.",
                f"N run: {', '.join(f'{n:,}' for n in ns)} images of 32x32/48x48 px ({LABELED} labeled in {CLASSES} classes, "
                f"{TEST} test, the rest unlabeled); prepare.image_size=32, augment.views=2, distill kd x 50 iterations.",
                "",
                "Peak RSS (MiB, largest process of the step, includes touched pages of memory-mapped files):",
                "",
                markdown_table(header, rss_rows),
                "",
                "Peak anonymous memory (MiB, Pss_Anon summed over the step's processes, sampled every 0.2 s):",
                "",
                markdown_table(header, anon_rows),
                "",
                "Wall time (s):",
                "",
                markdown_table(header[:-1], time_rows),
                "",
                f"Goal: peak memory flat in N (largest N within {100 * (GOAL_FLAT - 1):.0f}% of the smallest): "
                f"{'met' if flat else 'not met'} by peak RSS"
                f"{'' if high >= LARGE_N else f' (only up to N={high:,}: run with --large for 200k)'}.",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--large", action="store_true", help=f"also N={LARGE_N:,} (generating it takes minutes)"
    )
    parser.add_argument(
        "--n", type=int, action="append", help="instead, these N (repeatable), e.g. for a smoke run"
    )
    parser.add_argument(
        "--out", help="results path without suffix (default benchmarks/results/memory_scaling)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    ns = sorted(set(args.n or [*QUICK_N, *([LARGE_N] if args.large else [])]))
    if ns[0] < LABELED + TEST + 100:
        parser.error(
            f"--n: at least {LABELED + TEST + 100} (the labeled and test images plus some unlabeled)"
        )
    smoke = bool(args.n) and max(ns) < QUICK_N[0]
    out = REPO / (args.out or "benchmarks/results/memory_scaling")
    result: dict = {
        **provenance("benchmarks.memory_scaling", argv),
        "smoke": smoke,
        "n": ns,
        "table": {},
        "grow_seconds": {},
    }

    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-memory-bench-"))
    try:
        work = Workspace(tmp)
        for n in ns:
            result["grow_seconds"][n] = round(work.grow_to(n), 1)
            result["table"][n] = work.steps_at(n)
            print(
                f"N={n:,}: "
                + ", ".join(
                    f"{s} {m['peak_rss_mib']:.0f} MiB RSS / {m['peak_anon_mib']:.0f} MiB anon "
                    f"({m['seconds']:.0f} s)"
                    for s, m in result["table"][n].items()
                ),
                flush=True,
            )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["rss_ratio"] = ratios(result["table"], "peak_rss_mib")
    result["anon_ratio"] = ratios(result["table"], "peak_anon_mib")
    write_results(out, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
