"""Installable as a library: the package metadata asks only for what the library needs, the library
imports and works without the lab's and the web app's dependencies, and a command that needs an
extra says which one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ["tqdm", "matplotlib", "ninja", "fastapi", "uvicorn", "starlette", "websockets", "keras", "playwright",
           "hypothesis", "httpx", "onnx", "onnxscript", "expecttest"]

# a meta-path finder that makes these packages absent, as in an environment with only torch and numpy
BLOCKER = f"""
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Absent())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_the_package_asks_only_for_torch_and_numpy_as_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"torch", "numpy"}
    assert not any("==" in d for d in project["dependencies"])  # exact pins live in requirements/lock.txt
    assert {"lab", "web", "test"} <= set(project["optional-dependencies"])
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    assert "torch==2.13.0" in lock


def test_the_library_works_without_the_lab_and_web_dependencies():
    done = _python("""
import torch, bnlab.nn as bnn, bnlab.functional as BF, bnlab.reference
x = torch.randn(8, 4, requires_grad=True)
for layer in (bnn.BatchNorm1d(4), bnn.GhostBatchNorm1d(4, virtual_batch_size=4), bnn.BatchRenorm1d(4),
              bnn.LayerNorm(4), bnn.make_norm("group", 4)):
    layer(x).sum().backward()
import bnlab.errors
blocked = [m for m in sys.modules if m.partition(".")[0] in BLOCKED_NAMES]
assert not blocked, blocked
print("ok")
""".replace("BLOCKED_NAMES", repr(BLOCKED)))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_command_that_needs_an_extra_says_which(tmp_path):
    cli = "from bnlab.cli.main import main; sys.exit(main(sys.argv[1:]))"
    done = _python(cli, "compare", "--store", str(tmp_path / "runs.sqlite"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "pip install 'bnlab[lab]'" in done.stderr and done.stderr.count("\n") == 1
    listed = _python(cli, "runs", "list", "--store", str(tmp_path / "runs.sqlite"))  # needs nothing more
    assert listed.returncode == 0 and "no runs in" in listed.stdout, listed.stderr[-2000:]
