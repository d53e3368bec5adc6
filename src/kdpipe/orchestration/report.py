"""``kdpipe report``: render the pipeline's DVC plots to PNG offline and write a one-page report.

``dvc plots show`` writes HTML that loads Vega from a CDN, so it shows nothing offline. Here the
Vega-Lite specs come from ``dvc plots show --json`` (data already inlined by DVC) and are rendered
to PNG with vl-convert, which needs no browser and no network. The report (``report.md``) puts
the key metrics and every image on one page.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdpipe.core.atomic import atomic_path, read_json, write_text
from kdpipe.core.errors import KdpipeError


def plot_specs(repo: str | os.PathLike = ".") -> dict[str, list[dict[str, Any]]]:
    """``dvc plots show --json`` of the workspace: plot id -> rendered entries."""
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", "plots", "show", "--json"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise KdpipeError(f"`dvc plots show --json` failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout).get("data", {})


def _file_name(plot_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plot_id.removeprefix("reports/")).strip("_")


def colour_lines_by_field(spec: dict[str, Any]) -> dict[str, Any]:
    """With a single revision, colour the lines of a multi-field DVC plot by field.

    DVC's line templates colour by revision (git commit or workspace) and tell the y fields apart
    by dash pattern only; with one revision every line has the same colour, which is hard to read
    in a PNG. The report only ever shows the workspace, so it colours by field (dashes stay, for
    greyscale printing). Specs with several revisions, or one field, are returned unchanged.
    """
    encoding = spec.get("encoding", {})
    colour, dash = encoding.get("color", {}), encoding.get("strokeDash", {})
    revisions = colour.get("scale", {}).get("domain", [])
    if colour.get("field") != "rev" or len(revisions) != 1 or dash.get("field") != "field":
        return spec
    recoloured = copy.deepcopy(spec)  # the caller's spec stays DVC's
    # the explicit domain keeps the hover-rule layer (pivoted data, no "field") out of the legend
    recoloured["encoding"]["color"] = {
        "field": "field",
        "type": "nominal",
        "title": "field",
        "scale": {"domain": list(dash.get("scale", {}).get("domain", []))},
    }
    # same field and domain for colour and dash: Vega-Lite draws ONE legend with coloured dashes
    recoloured["encoding"]["strokeDash"] = {key: value for key, value in dash.items() if key != "legend"}
    for layer in recoloured.get("layer", []):
        if layer.get("encoding", {}).get("color", {}).get("field") == "rev":
            layer["encoding"]["color"] = {"field": "field", "type": "nominal"}
    return recoloured


def render(plots: dict[str, list[dict[str, Any]]], out_dir: Path, repo: Path) -> list[tuple[str, Path]]:
    """Write one PNG per named plot; returns (title, path) pairs in plot order.

    Plots named after a report file (the stages' default renderings) are skipped when a named
    top-level plot shows the same data, which is the case for every curve in dvc.yaml.
    """
    import vl_convert

    written = []
    for plot_id, entries in plots.items():
        for entry in entries:
            if entry.get("type") == "vega" and not plot_id.startswith("reports/"):
                spec = colour_lines_by_field(entry["content"])
                target = out_dir / f"{_file_name(plot_id)}.png"
                with atomic_path(target) as tmp:
                    tmp.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
                written.append(
                    (
                        spec.get("title", {}).get("text", plot_id)
                        if isinstance(spec.get("title"), dict)
                        else spec.get("title", plot_id),
                        target,
                    )
                )
            elif entry.get("type") == "image":
                source = repo / entry["url"] if not Path(entry["url"]).is_absolute() else Path(entry["url"])
                if source.is_file():
                    target = out_dir / _file_name(plot_id)
                    with atomic_path(target) as tmp:
                        shutil.copyfile(source, tmp)
                    written.append((plot_id, target))
    return written


def _load(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def summary_rows(repo: Path) -> list[tuple[str, Any]]:
    """The key numbers of the last run, read from the stages' report files."""
    r = repo / "reports"
    manifest = _load(r / "prepare/manifest.json") or {}
    teacher = _load(r / "teacher/metrics.json") or {}
    distill = _load(r / "distill/metrics.json") or {}
    selection = _load(r / "select/selection.json") or {}
    evaluation = _load(r / "evaluate/metrics.json") or {}
    decision = _load(r / "register/decision.json") or {}
    counts = manifest.get("counts", {})
    return [
        ("data version", manifest.get("data_version", "")[:12] or None),
        (
            "images: train / val / unlabeled / test / rejected",
            " / ".join(str(counts.get(k, "–")) for k in ("train", "val", "unlabeled", "test", "rejected")),
        ),
        (
            "teacher",
            teacher.get("arch")
            and f"{teacher.get('arch')} ({teacher.get('weights') or 'from scratch'}, "
            f"{teacher.get('image_size')} px)",
        ),
        ("teacher validation accuracy", teacher.get("val_accuracy")),
        ("recipe", distill.get("recipe")),
        ("iterations", distill.get("iterations")),
        ("best validation accuracy: student", distill.get("val_acc_student")),
        ("best validation accuracy: co-trained teacher", distill.get("val_acc_teacher")),
        ("selected model", selection.get("chosen")),
        ("why", selection.get("reason")),
        ("test accuracy (ONNX fp32)", evaluation.get("accuracy")),
        ("test accuracy (ONNX INT8)", evaluation.get("int8_accuracy")),
        (
            "latency p50 / p95 at batch 1 (ms)",
            f"{_fmt(evaluation.get('latency_ms_p50'))} / {_fmt(evaluation.get('latency_ms_p95'))}",
        ),
        ("throughput (images/s)", evaluation.get("throughput_ips")),
        ("registry", decision.get("reason") and f"v{decision.get('version')}: {decision.get('reason')}"),
    ]


def write_report(repo: str | os.PathLike = ".", out_dir: str | os.PathLike = "reports/summary") -> Path:
    repo, out = Path(repo), Path(out_dir)
    if not (repo / "reports").is_dir():
        raise KdpipeError(f"{repo / 'reports'}: no pipeline reports yet (run `make repro` first)")
    out.mkdir(parents=True, exist_ok=True)
    images = render(plot_specs(repo), out, repo)
    # A plot with no data this time (e.g. the adaptive augmentation schedule under a recipe without it) must not
    # leave an earlier run's picture beside this run's report.
    current = {path.name for _, path in images}
    for stale in out.glob("*.png"):
        if stale.name not in current:
            stale.unlink()
    lines = ["# kdpipe run report", "", "| what | value |", "| --- | --- |"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in summary_rows(repo)]
    lines.append("")
    for title, path in images:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    print(f"report: {len(images)} images and {report}")
    return report
