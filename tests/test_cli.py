"""The bnlab command: help, version, one-line errors with exit code 2, and the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bnlab
from bnlab.cli.main import main

BNLAB = Path(sys.executable).with_name("bnlab")


def test_console_script_version_and_help():
    out = subprocess.run([str(BNLAB), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"bnlab {bnlab.__version__}"
    out = subprocess.run([str(BNLAB), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "usage: bnlab" in out


@pytest.mark.parametrize(
    "argv,reason",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["demo", "--steps", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_input_exits_2_with_one_line_reason(argv, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "--help" in err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: bnlab" in capsys.readouterr().out


def test_demo_runs_and_reports_both_models(capsys):
    assert main(["demo", "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "no BN" in out and "with BN" in out


def test_help_never_imports_torch():
    """`bnlab --help` (and every subcommand's) answers without importing torch (a second or more)."""
    import subprocess
    import sys

    from bnlab.cli.main import SUBCOMMANDS

    names = [m.__name__.rsplit(".", 1)[-1] for m in SUBCOMMANDS]
    code = (
        "import sys\nfrom bnlab.cli.main import main\n"
        "for argv in [['--help']] + [[name, '--help'] for name in sys.argv[1:]]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)\n")
    commands = {"convert": "convert-momentum"}
    out = subprocess.run([sys.executable, "-c", code, *[commands.get(n, n) for n in names]], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    assert out == "False"
