"""benchmarks/gpu_check.sh: the GPU checks as one script (its --dry-run; no GPU needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


def test_dry_run_records_the_three_steps_without_running_them(tmp_path: Path) -> None:
    done = run_script("--dry-run", str(tmp_path / "out"), SPOTS="512", EPOCHS="1")
    assert done.returncode == 0, done.stderr
    steps = dict(
        line.split("\t", 1) for line in (tmp_path / "out" / "commands.txt").read_text().splitlines()
    )
    assert list(steps) == ["train_channels_last", "train_compile", "her2st_fold0"]
    for name in ("train_channels_last", "train_compile"):
        command = steps[name]
        assert "benchmarks/train.py --preset swin_t --device cuda --spots 512" in command
        assert "--channels-last" in command and f"{name}.json" in command
    assert "--compile" in steps["train_compile"]
    assert "--compile" not in steps["train_channels_last"]
    fold = steps["her2st_fold0"]
    assert "config/her2st.yaml" in fold and "config/her2st_gpu.yaml" in fold
    assert "training={epochs: 1}" in fold and "methods=[stevs]" in fold
    assert fold.endswith("her2st_gpu/metrics/stevs/fold0.tsv")
    # nothing ran: no logs, no numbers
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["commands.txt", "summary.tsv"]


def test_unknown_options_are_refused_with_usage(tmp_path: Path) -> None:
    done = run_script("--fast", str(tmp_path))
    assert done.returncode == 2
    assert "unknown option --fast" in done.stderr and "usage:" in done.stderr
