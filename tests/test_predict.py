"""predict: same preprocessing as prepare (so evaluate's accuracy is reproduced), bad files are rows."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from colour_data import COLOURS, probe_model, write_images

from kdpipe.cli import main
from kdpipe.core.errors import KdpipeError
from kdpipe.core.params import Params
from kdpipe.data.prepared import load_prepared
from kdpipe.steps import evaluate, export, prepare
from kdpipe.steps.predict import predict, write_predictions
from kdpipe.training import checkpoints


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """data -> prepare -> random cnn_tiny -> export -> evaluate, in a module-wide folder."""
    tmp = tmp_path_factory.mktemp("predict")
    write_images(
        tmp / "data",
        "labeled",
        {"blue": 3, "green": 3, "red": 3},
        seed=0,
        max_side=48,
        noise=60,
        mixed_formats=True,
    )
    write_images(
        tmp / "data",
        "test",
        {"blue": 5, "green": 5, "red": 5},
        seed=1,
        max_side=48,
        noise=60,
        mixed_formats=True,
    )
    params = Params()
    params.export.calibration_samples = 8
    params.evaluate.latency_runs = 3
    params.evaluate.throughput_batch = 4
    prepare.run(params, tmp / "data", tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    model = probe_model(data)
    checkpoints.save(
        checkpoints.model_checkpoint(model, "cnn_tiny", data.num_classes, data.image_size, data.class_names),
        tmp / "selected" / "model.pt",
    )
    export.run(params, tmp / "selected", tmp / "prepared", tmp / "export")
    evaluate.run(params, tmp / "export", tmp / "prepared", tmp / "evaluation")
    return {
        "root": tmp,
        "data": tmp / "data",
        "model": tmp / "export" / "model.onnx",
        "metrics": tmp / "evaluation" / "metrics.json",
    }


def test_predict_reproduces_evaluate_accuracy(pipeline):
    rows = predict(pipeline["model"], [pipeline["data"] / "test"], top_k=3, batch_size=4)
    assert len(rows) == 15 and all(r["error"] is None for r in rows)
    correct = [Path(r["path"]).parent.name == r["top1"] for r in rows]
    metrics = json.loads(pipeline["metrics"].read_text())
    assert len({r["top1"] for r in rows}) > 1  # the model does discriminate: the match is not trivial
    assert sum(correct) / len(rows) == metrics["accuracy"]  # exact: identical pixels, identical graph
    row = rows[0]
    assert list(row) == ["path", "top1", "p1", "top2", "p2", "top3", "p3", "error"]
    assert row["p1"] >= row["p2"] >= row["p3"] and row["p1"] + row["p2"] + row["p3"] == pytest.approx(1.0)


def test_int8_model_matches_evaluate_too(pipeline):
    rows = predict(pipeline["model"].with_name("model.int8.onnx"), [pipeline["data"] / "test"])
    accuracy = sum(Path(r["path"]).parent.name == r["top1"] for r in rows) / len(rows)
    assert accuracy == json.loads(pipeline["metrics"].read_text())["int8_accuracy"]


def test_corrupt_file_gives_an_error_row(pipeline, tmp_path):
    folder = tmp_path / "inbox"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(next((pipeline["data"] / "test" / "red").glob("*.png")), folder / "nested" / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    rows = {Path(r["path"]).name: r for r in predict(pipeline["model"], [folder], top_k=2)}
    assert set(rows) == {"good.png", "bad.png", "empty.jpg"}
    assert rows["good.png"]["error"] is None and rows["good.png"]["top1"] in COLOURS
    assert rows["bad.png"]["error"].startswith(("corrupt", "not_an_image", "truncated"))
    assert rows["bad.png"]["top1"] is None
    assert rows["empty.jpg"]["error"].startswith("zero_byte")


def test_write_predictions_csv_and_json(pipeline, tmp_path):
    rows = predict(pipeline["model"], [pipeline["data"] / "test" / "blue"], top_k=2)
    rows.append(
        {"path": "x.png", "top1": None, "p1": None, "top2": None, "p2": None, "error": "corrupt: bad"}
    )
    write_predictions(rows, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["path", "top1", "p1", "top2", "p2", "error"]
    assert len(table) == 6 and table[-1]["error"] == "corrupt: bad" and table[-1]["top1"] == ""
    write_predictions(rows, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == rows
    with pytest.raises(KdpipeError, match=r"\.csv or \.json"):
        write_predictions(rows, tmp_path / "out.txt")


def test_missing_sidecar_or_input_is_an_error(pipeline, tmp_path):
    lonely = tmp_path / "model.onnx"
    shutil.copy(pipeline["model"], lonely)
    with pytest.raises(KdpipeError, match="preprocess.json: not found"):
        predict(lonely, [pipeline["data"] / "test"])
    with pytest.raises(KdpipeError, match="no such file or folder"):
        predict(pipeline["model"], [tmp_path / "nope"])


def test_cli_predict(pipeline, tmp_path, capsys):
    out = tmp_path / "pred.json"
    code = main(
        [
            "predict",
            str(pipeline["data"] / "test" / "green"),
            "--model",
            str(pipeline["model"]),
            "--top-k",
            "1",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 5 and list(rows[0]) == ["path", "top1", "p1", "error"]
    assert "predict: 5 image(s) classified, 0 failed" in capsys.readouterr().err
    # Default: CSV on stdout.
    assert main(["predict", str(pipeline["data"] / "test" / "red"), "--model", str(pipeline["model"])]) == 0
    assert capsys.readouterr().out.startswith("path,top1,p1,top2,p2,top3,p3,error\n")
    assert main(["predict", str(tmp_path / "missing"), "--model", str(pipeline["model"])]) == 2


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--batch-size", "-3"], ["--top-k", "0"]])
def test_options_that_would_classify_nothing_are_refused(pipeline, tmp_path, capsys, option):
    out = tmp_path / "pred.csv"
    code = main(
        [
            "predict",
            str(pipeline["data"] / "test"),
            "--model",
            str(pipeline["model"]),
            "--output",
            str(out),
            *option,
        ]
    )
    assert code == 2 and option[0] in capsys.readouterr().err and not out.exists()


def test_a_folder_without_images_is_an_error_not_an_empty_csv(pipeline, tmp_path, capsys):
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "readme.txt").write_text("no pictures here")
    for folder in (empty, notes):
        out = tmp_path / f"{folder.name}.csv"
        assert main(["predict", str(folder), "--model", str(pipeline["model"]), "--output", str(out)]) == 2
        assert "no image file found" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "sidecar, message",
    [
        ("{not json", "not valid JSON"),
        ('{"image_size": 16, "class_names": ["blue", "green"]}', "lists 2 class names but"),
        (
            '{"image_size": "big", "class_names": ["blue", "green", "red"]}',
            "image_size must be a positive integer",
        ),
        ('{"image_size": 16, "class_names": []}', "class_names must be a non-empty list"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_broken_sidecar_is_one_clear_error(pipeline, tmp_path, capsys, sidecar, message):
    model = tmp_path / "model.onnx"
    shutil.copy(pipeline["model"], model)
    (tmp_path / "preprocess.json").write_text(sidecar)
    assert main(["predict", str(pipeline["data"] / "test"), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert message in err and "preprocess.json" in err and "Traceback" not in err


def test_output_in_a_read_only_folder_fails_before_classifying(pipeline, tmp_path, capsys, monkeypatch):
    from test_write_failures import _can_mount, tmpfs

    if not _can_mount():
        pytest.skip("needs root and mount(8) to make a read-only tmpfs")
    import kdpipe.steps.predict as predict_module

    called = []
    monkeypatch.setattr(predict_module, "predict", lambda *a, **k: called.append(1) or [])
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        code = main(
            [
                "predict",
                str(pipeline["data"] / "test"),
                "--model",
                str(pipeline["model"]),
                "--output",
                str(ro / "pred.csv"),
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "read-only" in err and "Traceback" not in err
    assert called == []  # nothing was classified for a result that could not be saved


def test_file_names_a_spreadsheet_would_run_are_quoted_in_csv_only(pipeline, tmp_path, capsys, monkeypatch):
    """CSV injection (OWASP): run inside a folder, file names are the first cells; one that starts with
    = + - @ would be evaluated by a spreadsheet, so the CSV quotes it. The JSON stays exact."""
    good = next((pipeline["data"] / "test" / "red").glob("*.png")).read_bytes()
    names = ["=1+1.png", "=HYPERLINK(x).png", "+SUM(1,2).png", "@SUM(1).png", "-2.png", "plain.png"]
    for name in names:
        (tmp_path / name).write_bytes(good)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", ".", "--model", str(pipeline["model"]), "--top-k", "1"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(row["path"] for row in table) == sorted(
        name if name == "plain.png" else "'" + name for name in names
    )
    assert (
        main(["predict", ".", "--model", str(pipeline["model"]), "--top-k", "1", "--output", "out.json"]) == 0
    )
    assert sorted(row["path"] for row in json.loads((tmp_path / "out.json").read_text())) == sorted(names)


def test_nothing_classified_is_a_failure_with_every_reason_written(pipeline, tmp_path, capsys):
    """No image could be classified: the rows with their reasons are still written, and the exit code
    is not 0 (a script must not take an empty result for a success)."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "inbox" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "pred.csv"
    code = main(["predict", str(tmp_path / "inbox"), "--model", str(pipeline["model"]), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "none of the 2 image(s) could be classified" in err
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 2 and all(row["error"] for row in rows)
