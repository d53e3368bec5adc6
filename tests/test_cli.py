"""The kdpipe command line: help on every subcommand, lazy start-up, clean errors."""

import subprocess
import sys

import pytest

from kdpipe.cli import STEPS, main

SUBCOMMANDS = ["demo-data", "params", *STEPS]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kdpipe" in capsys.readouterr().out


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from kdpipe.cli import main\n"
        "try:\n    main(['distill', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'torchvision', 'mlflow', 'onnxruntime', 'dvc', 'kfp') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_params_typo_is_a_clean_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  recipie: full\n")
    assert main(["params", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.recipe'" in err and "Traceback" not in err
