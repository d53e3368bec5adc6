"""Register step against a real MLflow SQLite store in tmp_path: gate, aliases, loading, secrets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdpipe.core.params import Params
from kdpipe.steps import register
from kdpipe.steps.register import decide_promotion

SECRET = "kdpipe-test-secret-123"
ROOT = Path(__file__).resolve().parents[1]
NAME = "kdpipe-test-model"
IMAGE_SIZE = 16


# ---------------------------------------------------------------- upstream outputs


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    """A real tiny classifier exported once per module (input 'images', output 'logits'); it answers
    class "a" on every image, so it scores VAL_SCORES["a"] on the promotion split."""
    return export_tiny_model(tmp_path_factory.mktemp("onnx") / "model.onnx", answer=0)


def export_tiny_model(path: Path, answer: int | None = None) -> Path:
    """A cnn_tiny ONNX model; with ``answer`` it always predicts that class (a known accuracy)."""
    import torch

    from kdpipe.training.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_tiny", 3, IMAGE_SIZE).eval()
    if answer is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(-10.0)
            model.head.bias[answer] = 10.0
    torch.onnx.export(
        model,
        (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


# The promotion (validation) split's labels: a model that always answers "a" scores 0.6, "b" 0.3, "c" 0.1.
VAL_LABELS = [0] * 6 + [1] * 3 + [2] * 1
VAL_SCORES = {"a": 0.6, "b": 0.3, "c": 0.1}


def write_prepared_split(
    root: Path, data_version: str, val_labels=VAL_LABELS, classes=("a", "b", "c")
) -> Path:
    """A prepared folder at root/artifacts/prepared whose validation split has ``val_labels``."""
    from benchmarks.common import write_prepared

    rng = np.random.default_rng(0)

    def images(n):
        return rng.integers(0, 255, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    folder = root / "artifacts" / "prepared"
    n = len(val_labels)
    write_prepared(
        folder,
        images(6),
        np.arange(6) % len(classes),
        images(n),
        np.asarray(val_labels),
        images(0),
        images(4),
        np.arange(4) % len(classes),
        list(classes),
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["data_version"] = data_version
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_upstream(root: Path, model: Path, accuracy: float, data_version: str = "dv-1") -> tuple[Path, Path]:
    """Write export, evaluation and prepared outputs as the upstream steps do; returns
    (export_dir, evaluation_dir). The prepared data goes to root/artifacts/prepared (see
    :func:`write_prepared_split`) unless it is there already."""
    export_dir, evaluation_dir = root / "export", root / f"evaluate-{accuracy}"
    export_dir.mkdir(parents=True, exist_ok=True)
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / "model.onnx").write_bytes(model.read_bytes())
    _write(export_dir / "parity.json", {"max_abs": 1e-6, "agreement": 1.0})
    _write(export_dir / "preprocess.json", {"class_names": ["a", "b", "c"], "image_size": IMAGE_SIZE})
    _write(
        evaluation_dir / "metrics.json",
        {
            "accuracy": accuracy,
            "int8_accuracy": None,
            "macro_f1": 0.5,
            "models": {"model.onnx": {"accuracy": accuracy}},
        },
    )
    (evaluation_dir / "report.md").write_text("# report\n")
    (evaluation_dir / "confusion.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _write(evaluation_dir / "confusion.json", {"matrix": [[1, 0], [0, 1]]})
    if not (root / "artifacts" / "prepared" / "manifest.json").is_file():
        write_prepared_split(root, data_version)
    return export_dir, evaluation_dir


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_params(**register_values) -> Params:
    return Params.model_validate({"register": {"model_name": NAME, **register_values}})


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite file: creating the schema takes ~4 s, copying it 0."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("empty-store")
    SqlAlchemyStore(f"sqlite:///{folder.as_posix()}/mlflow.db", (folder / "mlruns").as_uri()).engine.dispose()
    return folder / "mlflow.db"


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """A fresh SQLite MLflow store in tmp_path; cwd is tmp_path so nothing lands in the repo."""
    import shutil

    import mlflow

    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    for name in ("RANK", "KDPIPE_MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # mlflow keeps the URI globally (and in os.environ)


def _register(tmp_path, model, accuracy, **register_values):
    export_dir, evaluation_dir = make_upstream(tmp_path, model, accuracy)
    return register.run(
        make_params(**register_values),
        export_dir,
        evaluation_dir,
        tmp_path / "artifacts" / "prepared",
        tmp_path / "out",
    )


@pytest.fixture(scope="module")
def answering(tmp_path_factory) -> dict[str, Path]:
    """One ONNX model per class, each always answering that class."""
    folder = tmp_path_factory.mktemp("answering")
    return {name: export_tiny_model(folder / f"{name}.onnx", answer=k) for k, name in enumerate("abc")}


# ---------------------------------------------------------------- pure logic


@pytest.mark.parametrize(
    ("new", "champion", "min_improvement", "expected"),
    [
        (0.5, None, 0.0, True),  # first model becomes champion
        (0.8, 0.7, 0.0, True),  # strictly better
        (0.7, 0.7, 0.0, False),  # a tie keeps the champion
        (0.6, 0.7, 0.0, False),  # worse
        (0.9, 0.8, 0.1, True),  # exactly min_improvement (0.9 - 0.8 is 0.0999... in floats)
        (0.85, 0.8, 0.1, False),  # better, but not by enough
        (0.8, 0.8, 0.1, False),
    ],
)
def test_decide_promotion(new, champion, min_improvement, expected):
    promoted, reason = decide_promotion(new, champion, min_improvement)
    assert promoted is expected and reason


def test_execution_providers_follow_the_installed_distribution():
    import onnxruntime

    name, version = register.onnxruntime_distribution()
    assert name in ("onnxruntime", "onnxruntime-gpu") and version == onnxruntime.__version__
    assert register.execution_providers("onnxruntime") == ["CPUExecutionProvider"]
    assert register.execution_providers("onnxruntime-gpu")[0] == "CUDAExecutionProvider"


# ---------------------------------------------------------------- against MLflow


def test_champion_moves_only_for_a_better_model_on_the_validation_split(store, answering):
    """Promotion follows the validation split; the test accuracy is reported only: a model worse on
    validation is not promoted however good its test accuracy looks."""
    import mlflow

    first = _register(store, answering["b"], 0.5)
    assert first["registered"] and first["promoted"] and first["version"] == "1"
    assert first["champion_before"] is None and first["champion_after"] == {"version": "1", "accuracy": 0.3}
    assert first["promotion_split"] == {"split": "validation", "images": 10, "accuracy": 0.3}

    better = _register(store, answering["a"], 0.4)  # lower test accuracy, better on validation
    assert better["promoted"] and better["champion_before"] == {"version": "1", "accuracy": 0.3}
    assert "on the validation split (10 images, both scored now)" in better["reason"]

    worse = _register(store, answering["c"], 0.99)
    assert not worse["promoted"] and worse["champion_after"] == {"version": "2", "accuracy": 0.6}
    assert worse["accuracy"] == 0.99  # reported
    assert json.loads((store / "out" / "decision.json").read_text()) == worse

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    tags = client.get_model_version(NAME, "3").tags
    assert tags["test_accuracy"] == "0.99" and tags["promotion_accuracy"] == "0.1"
    assert tags["data_version"] == "dv-1" and tags["git_commit"] == "unknown"
    assert json.loads(tags["class_names"]) == ["a", "b", "c"]


def test_the_champion_is_scored_again_on_the_current_split(store, answering):
    """New data, new validation split: the champion is scored on it too, so a comparison never spans
    two data versions (its old score, 0.6, would have kept it)."""
    _register(store, answering["a"], 0.9)
    shutil.rmtree(store / "artifacts" / "prepared")
    write_prepared_split(store, "dv-2", val_labels=[1] * 7 + [0] * 3)  # now "a" scores 0.3, "b" 0.7
    decision = _register(store, answering["b"], 0.5)
    assert decision["promoted"] and decision["champion_before"] == {"version": "1", "accuracy": 0.3}
    assert decision["champion_after"] == {"version": "2", "accuracy": 0.7}


def test_a_new_class_set_starts_a_new_lineage_and_says_so(store, answering, tmp_path_factory):
    """A 4-class model against a 3-class champion: not comparable; the new one is promoted with the
    classes named (the old champion could never predict the new class)."""
    _register(store, answering["a"], 0.9)
    shutil.rmtree(store / "artifacts" / "prepared")
    write_prepared_split(store, "dv-2", val_labels=[3] * 10, classes=("a", "b", "c", "d"))
    import torch

    from kdpipe.training.models import build_model

    four = tmp_path_factory.mktemp("four") / "model.onnx"
    model = build_model("cnn_tiny", 4, IMAGE_SIZE).eval()
    torch.onnx.export(
        model,
        (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        str(four),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    decision = _register(store, four, 0.2)
    assert decision["promoted"]
    assert "the class set changed since champion v1 (added: d; removed: none" in decision["reason"]
    assert "starts a new lineage" in decision["reason"]


def test_an_experiment_never_moves_the_champion(store, answering):
    """`make exp` runs with register.promote=false: the better model is registered (and becomes
    @challenger) but @champion stays where it was, and the decision says why."""
    import mlflow

    client = mlflow.MlflowClient()
    _register(store, answering["b"], 0.5)
    champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    experiment = _register(store, answering["a"], 0.99, promote=False)  # better on validation too
    assert experiment["registered"] and not experiment["promoted"]
    assert "register.promote is false" in experiment["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == experiment["version"]


def test_make_exp_runs_experiments_without_promotion_in_a_temporary_copy():
    recipe = next(
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "dvc exp run" in line and not line.lstrip().startswith("#")
    )
    assert (
        "--temp" in recipe
        and "-S register.promote=false" in recipe
        and "-S register.new_version=false" in recipe
    )


def test_an_experiment_adds_no_registry_version(store, answering):
    """register.new_version false (make exp): the model is logged with the run, the registry's version
    list and aliases are left as they were."""
    import mlflow

    _register(store, answering["b"], 0.5)
    decision = _register(store, answering["a"], 0.9, new_version=False, promote=False)
    assert not decision["registered"] and decision["version"] is None and not decision["promoted"]
    assert "no registry version" in decision["reason"]
    client = mlflow.MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    logged = [r for r in runs if r.data.tags.get("kdpipe.step") == "register"]
    assert any(mlflow.MlflowClient().list_artifacts(r.info.run_id, "model") for r in logged)


def test_quality_gate_blocks_registration(store, onnx_model):
    import mlflow

    decision = _register(store, onnx_model, 0.5, min_accuracy=0.6)
    assert decision["registered"] is False and "min_accuracy" in decision["reason"]
    assert json.loads((store / "out" / "decision.json").read_text())["registered"] is False
    assert mlflow.MlflowClient().search_registered_models() == []


def test_champion_loads_from_registry_and_matches_onnxruntime(store, onnx_model):
    import mlflow
    import onnxruntime as ort

    _register(store, onnx_model, 0.7)
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    batch = np.random.default_rng(0).random((4, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    predicted = loaded.predict(batch)["logits"]
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(predicted, session.run(["logits"], {"images": batch})[0], rtol=1e-5, atol=1e-6)
    # preprocess.json ships with the model, so a consumer of the registry can decode inputs.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    assert [p.name for p in local.glob("*.data")] == []  # a single self-contained model.onnx
    assert json.loads((local / "extra_files" / "preprocess.json").read_text())["image_size"] == IMAGE_SIZE


def test_one_parent_run_with_a_nested_register_run(store, onnx_model):
    import mlflow

    _register(store, onnx_model, 0.7)
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    parent, child = parents[0], children[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["kdpipe.step"] == "register"
    assert parent.data.params["register.model_name"] == NAME
    assert parent.data.tags["kdpipe.data_version"] == "dv-1"
    assert child.data.metrics["accuracy"] == 0.7
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/confusion.png", "evaluation/metrics.json"} <= artifacts
    # Register is the last step: the next execution starts a new parent run.
    assert not (store / "artifacts" / "mlflow_run.json").exists()


def test_credentials_never_reach_the_store(store, onnx_model, monkeypatch):
    from kdpipe.orchestration import tracking

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    params = Params.model_validate(
        {
            "data": {"root": f"s3://user:{SECRET}@bucket/data"},
            # The env URI (SQLite) wins; this value is still a param that must be logged redacted.
            "register": {"model_name": NAME, "tracking_uri": f"http://user:{SECRET}@127.0.0.1:9"},
        }
    )
    export_dir, evaluation_dir = make_upstream(store, onnx_model, 0.7)
    prepared = store / "artifacts" / "prepared"
    with tracking.pipeline_run(params):
        logged = tracking.log_params_flat(params)
        tracking.log_params_flat({"aws": {"secret_access_key": SECRET, "region": "eu"}})
    assert logged["data.root"] == "s3://***@bucket/data"
    register.run(params, export_dir, evaluation_dir, prepared, store / "out")

    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "model.onnx" for p in files)
    assert (store / "out" / "decision.json").is_file()
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_nothing_happens_on_a_non_zero_rank(store, onnx_model, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    db_before = (store / "mlflow.db").read_bytes()
    assert _register(store, onnx_model, 0.9) is None
    assert (store / "mlflow.db").read_bytes() == db_before and not (store / "mlruns").exists()
    assert not (store / "out").exists()
