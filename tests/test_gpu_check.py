"""benchmarks/gpu_check.sh: the GPU checks as one script (its --dry-run; no GPU needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_dry_run_records_the_four_steps_without_running_them(tmp_path: Path) -> None:
    done = run_script("--dry-run", str(tmp_path / "out"), SPOTS="512", EPOCHS="1")
    assert done.returncode == 0, done.stderr
    steps = dict(
        line.split("\t", 1) for line in (tmp_path / "out" / "commands.txt").read_text().splitlines()
    )
    assert list(steps) == [
        "train_channels_last",
        "train_compile",
        "embed_auto_batch",
        "her2st_fold0",
    ]
    for name in ("train_channels_last", "train_compile"):
        command = steps[name]
        assert "benchmarks/train.py --preset swin_t --device cuda --spots 512" in command
        assert "--channels-last" in command and f"{name}.json" in command
    assert "--compile" in steps["train_compile"]
    assert "--compile" not in steps["train_channels_last"]
    embed = steps["embed_auto_batch"]
    assert "benchmarks/embed.py --scale full --device cuda" in embed and "uni" in embed
    assert "--batch-size auto" in embed and "embed_auto_batch.json" in embed
    fold = steps["her2st_fold0"]
    assert "config/her2st.yaml" in fold and "config/her2st_gpu.yaml" in fold
    overlay = tmp_path / "out" / "her2st_fold0.yaml"
    assert str(overlay) in fold
    assert yaml.safe_load(overlay.read_text()) == {"training": {"epochs": 1}, "methods": ["stevs"]}
    assert fold.endswith("her2st_gpu/metrics/swin_t/stevs/seed0/fold0.tsv")
    # nothing ran: no logs, no numbers
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["commands.txt", "her2st_fold0.yaml", "summary.tsv"]


def test_unknown_options_are_refused_with_usage(tmp_path: Path) -> None:
    done = run_script("--fast", str(tmp_path))
    assert done.returncode == 2
    assert "unknown option --fast" in done.stderr and "usage:" in done.stderr


def test_the_her2st_fold_step_plans_in_snakemake(tmp_path: Path, her2st_dir: Path) -> None:
    """The recorded fold command, dry-run: its config overlay passes the schema and its
    target is a file the workflow makes (both were wrong once, unseen without a GPU)."""
    done = run_script("--dry-run", str(tmp_path / "out"), EPOCHS="2", HER2ST=str(her2st_dir))
    assert done.returncode == 0, done.stderr
    commands = (tmp_path / "out" / "commands.txt").read_text().splitlines()
    fold = dict(line.split("\t", 1) for line in commands)["her2st_fold0"].split(" ")
    at = fold.index("snakemake") + 1
    planned = subprocess.run(
        [*fold[:at], "-n", *fold[at:]], capture_output=True, text=True, timeout=120, check=False
    )
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "rule run_fold:" in planned.stdout and "swin_t/stevs/seed0/fold0" in planned.stdout
