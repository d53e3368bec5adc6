"""params.yaml schema: defaults, typos, types and ranges give messages naming the key."""

from pathlib import Path

import pytest
import yaml

from kdpipe.core.errors import ParamsError
from kdpipe.core.params import DEMO_SETTINGS, Params, dump_defaults, load_params, validate_params

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_file_is_valid_and_complete():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = validate_params(raw)
    # Every schema key appears in params.yaml, so users see every knob in one place.
    for group, values in dump_defaults().items():
        assert set(raw[group]) == set(values), f"params.yaml group '{group}' is missing keys"
    assert params.train.recipe == "kd"


def test_params_file_is_the_defaults_plus_the_declared_demo_settings():
    """One source of defaults: the schema. params.yaml repeats it (every knob in one place) and differs
    only where params.DEMO_SETTINGS says, for the embedded demo."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = dump_defaults()
    for dotted, value in DEMO_SETTINGS.items():
        group, key = dotted.split(".")
        assert expected[group][key] != value, f"{dotted} is the default already: drop it from DEMO_SETTINGS"
        expected[group][key] = value
    differing = {
        f"{g}.{k}": (raw[g][k], v)
        for g, values in expected.items()
        for k, v in values.items()
        if raw[g][k] != v
    }
    assert differing == {}, "params.yaml (left) disagrees with the schema's defaults + DEMO_SETTINGS (right)"


def test_the_training_loop_takes_every_setting_from_params():
    """No third copy of the defaults: LoopConfig is built from the params, field by field."""
    from dataclasses import fields

    from kdpipe.training.engine import LoopConfig

    train = Params().train
    cfg = LoopConfig.from_train(train)
    for f in fields(LoopConfig):
        if f.name in type(train).model_fields and f.name != "keep_checkpoint":  # "auto" is resolved
            assert getattr(cfg, f.name) == getattr(train, f.name), f.name
    assert train.keep_checkpoint == "auto" and cfg.keep_checkpoint == "best"  # no recipe given


def test_groups_follow_the_pipeline_steps():
    assert list(Params.model_fields) == [
        "data",
        "prepare",
        "augment",
        "teacher",
        "train",
        "select",
        "export",
        "evaluate",
        "register",
    ]


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ParamsError) as err:
        validate_params({"train": {"learning_rate": 0.1, "recipee": "full"}})
    text = str(err.value)
    assert "unknown key 'train.recipee'" in text and "did you mean 'train.recipe'" in text
    assert "unknown key 'train.learning_rate'" in text


def test_a_removed_setting_says_what_replaced_it():
    """data.prepared moved prepare's output but no other step read it (they take --prepared-dir), so
    `kdpipe teacher -S data.prepared=X` trained on other data without a word: it no longer exists."""
    with pytest.raises(ParamsError, match=r"'data.prepared' was removed: .*--prepared-dir"):
        validate_params({"data": {"root": "data", "prepared": "elsewhere"}})


def test_unknown_group_suggests_the_group():
    with pytest.raises(ParamsError, match=r"unknown key 'trian'; did you mean 'train'"):
        validate_params({"trian": {"lr": 0.1}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ParamsError) as err:
        validate_params({"train": {"batch_size": "big"}})
    assert "train.batch_size" in str(err.value) and "'big'" in str(err.value) and "int" in str(err.value)


def test_out_of_range_names_key_and_allowed_range():
    with pytest.raises(ParamsError) as err:
        validate_params({"train": {"lr": -0.1}})
    assert "train.lr" in str(err.value) and "> 0.0" in str(err.value) and "<= 10.0" in str(err.value)


@pytest.mark.parametrize("recipe", ["consistency", "full"])
def test_view_recipes_need_two_views(recipe):
    with pytest.raises(ParamsError, match="train.views.*views >= 2"):
        validate_params({"train": {"recipe": recipe, "views": 1}})


def test_unlabeled_recipes_need_unlabeled_samples():
    with pytest.raises(ParamsError, match="train.mu.*must be > 0"):
        validate_params({"train": {"recipe": "cotrain", "mu": 0}})
    assert validate_params({"train": {"recipe": "supervised", "mu": 0}}).train.mu == 0


def test_load_params_applies_overrides_with_yaml_types(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  recipe: cotrain\n")
    params = load_params(path, ["train.lr=0.2", "export.int8=false", "train.recipe=adaptive"])
    assert params.train.lr == 0.2 and params.export.int8 is False and params.train.recipe == "adaptive"


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(path)


def test_write_overrides_edits_values_in_place_and_keeps_comments(tmp_path):
    from kdpipe.core.params import write_overrides

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    changed = write_overrides(
        path, ["prepare.image_size=64", "augment.flip=true", "evaluate.providers=[CPUExecutionProvider]"]
    )
    assert changed == [
        "prepare.image_size: 64",
        "augment.flip: true",
        "evaluate.providers: [CPUExecutionProvider]",
    ]
    text = path.read_text()
    assert "  image_size: 64             # images are resized" in text  # the comment stays in its column
    assert load_params(path).prepare.image_size == 64 and load_params(path).augment.flip is True
    # a comment that explained the demo's value no longer describes the line (it said digits are not
    # mirror-symmetric next to flip: true)
    (flip,) = [line for line in text.splitlines() if line.strip().startswith("flip:")]
    assert flip.split("#")[1].strip() == "set for this project (the demo's value was false)"
    # every other line is untouched
    diff = [(a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(diff) == 2


def test_write_overrides_refuses_before_writing(tmp_path):
    from kdpipe.core.params import write_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    for bad in (
        ["prepare.image_sise=64"],
        ["prepare.image_size=2"],
        ["prepare.image_size=64", "train.lr=-1"],
    ):
        with pytest.raises(ParamsError):
            write_overrides(path, bad)
        assert path.read_bytes() == before


def test_schema_defaults_and_params_yaml_agree_on_the_teacher_and_distillation_defaults():
    """The settings the pretrained-teacher default depends on have one value, wherever it is read."""
    from kdpipe.core.params import Params

    committed = load_params(REPO / "params.yaml")
    schema = Params()
    for group, keys in {
        "teacher": (
            "arch",
            "weights",
            "lr",
            "backbone_lr_scale",
            "freeze_batchnorm",
            "label_smoothing",
            "warmup_fraction",
        ),
        "train": ("recipe", "tau", "mutual_tau", "mu", "lr"),
        "select": ("max_params",),
    }.items():
        for key in keys:
            assert getattr(getattr(committed, group), key) == getattr(getattr(schema, group), key), (
                f"{group}.{key}"
            )


def test_old_short_names_of_the_loss_weights_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="train.a is deprecated, use train.w_labels"):
        assert validate_params({"train": {"a": 0.5}}).train.w_labels == 0.5
    with pytest.warns(FutureWarning, match="train.delta is deprecated, use train.progress_margin"):
        assert validate_params({"train": {"delta": 0.01}}).train.progress_margin == 0.01
    with pytest.raises(ParamsError, match="w_consistency"):
        validate_params({"train": {"b": 0.5, "w_consistency": 1.0}})


def test_every_demo_setting_says_so_in_params_yaml():
    """write_overrides replaces a comment that starts with DEMO_COMMENT when the value changes: every
    demo setting's line must carry one, or its comment would go stale after `make repro S=...`."""
    from kdpipe.core.params import DEMO_COMMENT, DEMO_SETTINGS

    text = (REPO / "params.yaml").read_text().splitlines()
    for dotted in DEMO_SETTINGS:
        group, key = dotted.split(".")
        start = text.index(f"{group}:")
        line = next(line for line in text[start + 1 :] if line.strip().startswith(f"{key}:"))
        assert DEMO_COMMENT in line, line


@pytest.mark.parametrize(
    ("teacher", "prepared", "side", "more"),
    [(None, None, 32, False), (None, 48, 48, False), (32, None, 32, False), (96, None, 96, True)],
)
def test_the_teacher_image_size_is_decided_in_one_place(teacher, prepared, side, more):
    """teacher.image_size, else the student's: the prepared data's side when given, else prepare's."""
    params = validate_params({"teacher": {"image_size": teacher}, "prepare": {"image_size": 32}})
    assert params.teacher_image_size(prepared) == side
    assert params.teacher_sees_more_pixels() is more


def test_the_decoding_record_keeps_its_on_disk_key():
    """A renamed key would make every earlier prepared output look decoded otherwise (all re-decoded)."""
    from kdpipe.data.decoding import DecodeSettings
    from kdpipe.data.prepared_writer import decoding_record

    record = decoding_record(DecodeSettings(32, 96, 10_000_000, 8, 20.0))
    assert record["teacher_size"] == 96 and "teacher_image_size" not in record


def test_add_missing_fills_a_partial_file_and_keeps_what_is_there(tmp_path):
    from kdpipe.core.params import add_missing_defaults

    path = tmp_path / "params.yaml"
    path.write_text("# my project\ntrain:\n  recipe: supervised   # mine\n\nselect:\n  max_latency_ms: 5.0\n")
    added = add_missing_defaults(path)
    text = path.read_text()
    assert text.startswith("# my project\ntrain:\n  recipe: supervised   # mine\n")
    assert "train.lr: 0.1" in added and "train.recipe: supervised" not in " ".join(added)
    raw = yaml.safe_load(text)
    assert raw["select"]["max_latency_ms"] == 5.0 and raw["train"]["recipe"] == "supervised"
    assert {g: set(v) for g, v in raw.items()} == {g: set(v) for g, v in dump_defaults().items()}
    # each added key carries its description from the schema
    described = Params.model_fields["train"].annotation.model_fields["batch_size"].description
    assert f"# {described}" in next(
        line for line in text.splitlines() if line.strip().startswith("batch_size:")
    )
    assert add_missing_defaults(path) == [] and path.read_text() == text  # nothing missing: untouched
