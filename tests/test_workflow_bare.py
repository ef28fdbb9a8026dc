"""The workflow plans where only Snakemake is installed: while it parses the rules, it imports
no torch, scipy, h5py, ... (they are blocked here); every job runs `stevs` from the rule's
environment. `make test-plan-bare` does the same in a fresh venv holding only snakemake, its
SLURM plugin and pandas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a job needs and the parser must not: importing any of them raises ImportError
BLOCKED = (
    "torch",
    "torchvision",
    "scipy",
    "sklearn",
    "anndata",
    "scanpy",
    "h5py",
    "timm",
    "PIL",
    "skimage",
    "tifffile",
    "openslide",
    "zarr",
    "spatialdata",
    "matplotlib",
)

PLAN = """
import importlib.abc, json, os, sys
blocked, tried = {blocked!r}, []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            tried.append(name)
            raise ImportError(f"{{name}} is blocked")
sys.meta_path.insert(0, Block())
from snakemake.cli import main
from snakemake.shell import shell
sys.argv = ["snakemake", *{args!r}]
try:
    main()
except SystemExit as done:
    code = done.code
stevs = sorted(m for m in sys.modules if m.startswith("stevs"))
print("RESULT " + json.dumps({{"code": code, "prefix": shell._process_prefix, "stevs": stevs,
      "source": os.environ.get("STEVS_SOURCE"), "tried": tried}}))
"""


def _plan(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Snakemake run in a Python that refuses the BLOCKED packages (from an empty folder)."""
    argv = ["--directory", str(tmp_path), "-s", str(ROOT / "Snakefile"), *args]
    result = subprocess.run(
        [sys.executable, "-c", PLAN.format(blocked=BLOCKED, args=argv)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, output
    return json.loads(line.removeprefix("RESULT ")), output


def test_the_workflow_plans_without_the_heavy_packages(tmp_path):
    config = str(ROOT / ".test" / "config" / "config.yaml")
    result, output = _plan(tmp_path, "-n", "--cores", "2", "--configfile", config)
    assert result["code"] == 0, output
    assert "rule run_fold:" in output and "rule predict_slide:" in output
    assert not [
        m for m in result["stevs"] if m.startswith(("stevs.models.backbones", "stevs.folds"))
    ]
    assert "stevs.config_checks" in result["stevs"] and "stevs.fold_plan" in result["stevs"]
    # without conda, jobs run the stevs beside this Python; the conda env's post-deploy
    # script is told where the checkout is
    assert (
        result["prefix"]
        == f'set -euo pipefail; export PATH={Path(sys.executable).parent}:"$PATH"; '
    )
    assert result["source"] == str(ROOT)


def test_with_conda_the_jobs_path_is_left_to_the_env(tmp_path):
    """--sdm conda: no PATH prefix (the env's stevs runs). Snakemake's dry run then asks
    `conda info` where the environments go, so without conda it stops there, after parsing."""
    config = str(ROOT / ".test" / "config" / "config.yaml")
    result, output = _plan(tmp_path, "-n", "--sdm", "conda", "--configfile", config)
    assert result["prefix"] is None, output
    assert result["code"] == 0 or "conda info" in output, output
