"""Integrity through the command line: altered inputs are refused with a clear message (exit 2, the
file named, no traceback), pickled checkpoints never execute code, ONNX files are checked before use."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdpipe.cli import main
from kdpipe.data.prepared import ARRAY_FILES

SRC = Path(__file__).resolve().parents[1] / "src" / "kdpipe"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """CLI steps set torch's thread count from train.threads; later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tiny_pipeline_dirs, tmp_path_factory) -> Path:
    """The tiny teacher exported to ONNX (fp32 only): model.onnx + parity.json + preprocess.json."""
    from kdpipe.steps import export

    d = tiny_pipeline_dirs
    base = tmp_path_factory.mktemp("integrity")
    (base / "selected").mkdir()
    shutil.copyfile(d["teacher"] / "teacher.pt", base / "selected" / "model.pt")
    params = d["params"].model_copy(deep=True)
    params.export.int8 = False
    export.run(params, base / "selected", d["prepared"], base / "exported")
    return base / "exported"


@pytest.fixture
def params_file(tiny_pipeline_dirs, tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    raw = tiny_pipeline_dirs["params"].model_dump(mode="json")
    raw["evaluate"].update(latency_runs=2, throughput_batch=4)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- prepared data and stored views

# step -> (file altered, extra arguments); every reader of the prepared data verifies all its hashes
CONSUMERS = {
    "augment": ("train_x.npy", []),
    "teacher": ("train_y.npy", []),
    "distill": ("unlabeled_x.npy", ["--augmented-dir", "{augmented}", "--teacher-dir", "{teacher}"]),
    "select": ("val_x.npy", ["--distill-dir", "{teacher}"]),
    "export": ("val_y.npy", ["--selected-dir", "{teacher}"]),
    "evaluate": ("test_x.npy", ["--export-dir", "{exported}"]),
}


@pytest.mark.parametrize("step", list(CONSUMERS))
def test_altered_prepared_data_is_refused(step, tiny_pipeline_dirs, exported, params_file, tmp_path, capsys):
    d = tiny_pipeline_dirs
    name, extra = CONSUMERS[step]
    prepared = tmp_path / "prepared"
    shutil.copytree(d["prepared"], prepared)
    flip_last_byte(prepared / name)
    out = tmp_path / "out"
    values = {"augmented": d["augmented"], "teacher": d["teacher"], "exported": exported}
    extra = [str(values.get(a.strip("{}"), a)) for a in extra]
    code, err = cli(
        [step, "--params", params_file, "--prepared-dir", prepared, *extra, "--out-dir", out], capsys
    )
    assert code == 2
    assert (
        f"kdpipe {step}: error: {prepared / name}: content does not match the sha256 recorded in "
        "manifest.json" in err
    )
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_every_prepared_file_is_covered_by_the_manifest(tiny_pipeline_dirs):
    manifest = json.loads((tiny_pipeline_dirs["prepared"] / "manifest.json").read_text())
    assert set(ARRAY_FILES) | {"rows.npy", "sources.json", "rejected.json"} == set(manifest["files"])
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in manifest["files"].values())


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_altered_augmentation_sets_are_refused(damage, tiny_pipeline_dirs, params_file, tmp_path, capsys):
    d = tiny_pipeline_dirs
    augmented = tmp_path / "augmented"
    shutil.copytree(d["augmented"], augmented)
    views = augmented / "labeled_views.npy"
    flip_last_byte(views) if damage == "altered" else views.unlink()
    code, err = cli(
        [
            "distill",
            "--params",
            params_file,
            "-S",
            "train.recipe=consistency",
            "--prepared-dir",
            d["prepared"],
            "--augmented-dir",
            augmented,
            "--teacher-dir",
            d["teacher"],
            "--out-dir",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 2
    assert f"{views}: " in err and "policy.json" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- checkpoints never run pickled code


class Payload:
    """Pickles as a call to exec(): loading it with plain pickle runs the code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "arch": "cnn_tiny",
            "num_classes": 3,
            "image_size": 16,
            "class_names": ["a", "b", "c"],
            "state_dict": {"w": Payload(marker)},
            "iteration": 1,
        },
        path,
    )
    return path


def test_the_payload_is_live_without_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.read_text() == "pwned"


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    from kdpipe.core.errors import KdpipeError
    from kdpipe.training import checkpoints

    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(KdpipeError) as err:
        checkpoints.load(path)
    text = str(err.value)
    assert text.startswith(
        f"{path}: not a safe kdpipe checkpoint: it holds pickled Python objects (GLOBAL exec)"
    )
    assert "safetensors" in text and "\n" not in text
    assert (
        "weights_only" not in text and "will likely succeed" not in text
    )  # never the advice to load it unsafely
    assert not marker.exists()


@pytest.mark.parametrize("where", ["export", "select", "teacher", "distill-resume"])
def test_malicious_checkpoint_through_the_cli(where, tiny_pipeline_dirs, params_file, tmp_path, capsys):
    d = tiny_pipeline_dirs
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    out = tmp_path / "out"
    if where == "export":
        path = malicious_checkpoint(evil / "model.pt", marker)
        argv = ["export", "--selected-dir", evil, "--prepared-dir", d["prepared"], "--out-dir", out]
    elif where == "select":
        path = malicious_checkpoint(evil / "student.pt", marker)
        argv = ["select", "--distill-dir", evil, "--prepared-dir", d["prepared"], "--out-dir", out]
    elif where == "teacher":
        path = malicious_checkpoint(evil / "teacher.pt", marker)
        argv = [
            "teacher",
            "-S",
            f"teacher.checkpoint={path}",
            "--prepared-dir",
            d["prepared"],
            "--out-dir",
            out,
        ]
    else:  # a resume state planted in the distill output folder
        path = malicious_checkpoint(out / "last.pt", marker)
        argv = [
            "distill",
            "--prepared-dir",
            d["prepared"],
            "--augmented-dir",
            d["augmented"],
            "--teacher-dir",
            d["teacher"],
            "--out-dir",
            out,
        ]
    code, err = cli([argv[0], "--params", params_file, *argv[1:]], capsys)
    assert code == 2
    assert f"kdpipe {argv[0]}: error: {path}: not a safe kdpipe checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_every_torch_load_uses_weights_only_and_nothing_unpickles():
    """Static guard: no loader in the package may execute pickled code."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        for pattern in (
            r"allow_pickle\s*=\s*True",
            r"\bpickle\.loads?\(",
            r"yaml\.load\(",
            r"yaml\.unsafe_load",
            r"\bdill\b",
            r"\bcloudpickle\b",
        ):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


# ---------------------------------------------------------------- ONNX files are checked before use


@pytest.fixture
def garbage_export(exported, tmp_path) -> Path:
    folder = tmp_path / "garbage"
    shutil.copytree(exported, folder)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf ModelProto" * 10)
    return folder


def test_evaluate_refuses_a_garbage_model(garbage_export, tiny_pipeline_dirs, params_file, tmp_path, capsys):
    code, err = cli(
        [
            "evaluate",
            "--params",
            params_file,
            "--export-dir",
            garbage_export,
            "--prepared-dir",
            tiny_pipeline_dirs["prepared"],
            "--out-dir",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 2
    assert f"{garbage_export / 'model.onnx'}: not a valid ONNX model" in err
    assert not (tmp_path / "out").exists()


def test_predict_refuses_a_garbage_model(garbage_export, tiny_pipeline_dirs, tmp_path, capsys):
    image = tiny_pipeline_dirs["data"] / "test" / "red" / "red_000.png"
    code, err = cli(["predict", image, "--model", garbage_export / "model.onnx"], capsys)
    assert code == 2
    assert f"{garbage_export / 'model.onnx'}: not a valid ONNX model" in err


def test_register_refuses_a_garbage_model_before_logging(garbage_export, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    code, err = cli(
        [
            "register",
            "--export-dir",
            garbage_export,
            "--evaluation-dir",
            evaluation,
            "--out-dir",
            tmp_path / "registered",
        ],
        capsys,
    )
    assert code == 2
    assert f"{garbage_export / 'model.onnx'}: not a valid ONNX model" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "registered").exists()


def test_a_valid_export_still_evaluates(exported, tiny_pipeline_dirs, params_file, tmp_path, capsys):
    """The checks above refuse only what is broken."""
    code, err = cli(
        [
            "evaluate",
            "--params",
            params_file,
            "--export-dir",
            exported,
            "--prepared-dir",
            tiny_pipeline_dirs["prepared"],
            "--out-dir",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 0, err
    assert np.isfinite(json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"])
