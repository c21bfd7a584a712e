"""What the CLI loads before it refuses: bad input costs a fraction of a second, not the import of torch.

Each case runs `pipeline.commands.cli.main` in a fresh interpreter and lists the heavy packages it had imported when
it returned: torch alone takes seconds to import, torchvision and torchmetrics (with scipy, matplotlib and
torch._dynamo) several more, and the test suite runs hundreds of such commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

HEAVY = ("torch", "torchvision", "torchmetrics", "accelerate", "scipy", "matplotlib", "wandb", "optuna", "timm")

SCRIPT = f"""
import json, sys
from pipeline.commands.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"code": code, "loaded": loaded}}))
"""


def loaded_by(args: list[str]) -> tuple[int, list[str], str]:
    """(exit code, heavy packages imported, stderr) of `pipeline ARGS` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["code"], result["loaded"], done.stderr


@pytest.mark.parametrize("args, code, line", [
    (["--help"], 0, ""),
    (["train", "train.epochs=-1"], 2, "error: train.epochs=-1 is out of range"),
    (["train", "data.root=/nonexistent/x", "data.auto_prepare_digits=false"], 2,
     "error: data.root='/nonexistent/x' does not exist"),
])
def test_bad_input_is_refused_before_torch_is_imported(args: list[str], code: int, line: str) -> None:
    exit_code, loaded, stderr = loaded_by(args)
    assert exit_code == code and stderr.startswith(line), stderr
    assert loaded == [], f"imported before refusing: {loaded}"


def test_a_run_refused_by_its_checks_loads_neither_torchvision_nor_torchmetrics(digits_root: Path,
                                                                                 tmp_path: Path) -> None:
    """The data, preflight and run-folder checks need torch and Accelerate (the process group), not the model's or
    the metrics' packages (`pipeline.commands.train` imports those once the checks have passed)."""
    args = ["train", *TINY, f"data.root={digits_root}", f"run.output_dir={tmp_path}", "train.batch_size=100000"]
    exit_code, loaded, stderr = loaded_by(args)
    assert exit_code == 2 and stderr.startswith("error: train.batch_size=100000 x 1 rank(s)"), stderr
    assert set(loaded) <= {"torch", "accelerate"}, f"imported before refusing: {loaded}"
