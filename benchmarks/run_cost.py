"""CPU cost of the workflow's `stevs run` jobs, before and after a change, side by side.

Takes the `stevs run` commands of one fold from the workflow's own plan (`snakemake -n -p
--forceall` with the given config files, so arguments are exactly the rule's), points their
outputs at a scratch folder, and runs each one with the package of ``--before`` (a checkout
of the old code, e.g. ``git worktree add /tmp/before HEAD~1``) and of this checkout, one
after the other and alternating when ``--repeats`` > 1, so machine load hits both alike.
For each method: wall and CPU seconds (user + system of the child process), and whether
the two runs wrote the same files (SHA-256 of every model, metrics and predictions file;
the ``.h5ad`` files compared by their arrays, since anndata writes its version in them).
The slides, patches, embeddings and folds must exist (run the workflow once).

    python benchmarks/run_cost.py --before /tmp/before --fold fold0 \\
        --methods stevs ridge_rrr --configfile config/her2st.yaml config/her2st_effnet.yaml \\
        --config data_root=../shared/data/her2st
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def planned_runs(
    configfiles: list[str], config: list[str], fold: str, encoder: str | None
) -> dict[str, list[str]]:
    """The plan's `stevs run` command of each method on ``fold``, as argument lists; a
    method that runs on several encoders needs ``encoder`` (the run folder's first part:
    ``cpu_small``, ``effnet_lite0_in1k-frozen``, ``none``)."""
    snakemake = [sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "2"]
    command = [*snakemake, "--configfile", *configfiles]
    if config:
        command += ["--config", *config]
    plan = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    found: dict[str, dict[str, list[str]]] = {}
    for line in plan.splitlines():
        line = line.removeprefix("Shell command: ")
        if line.startswith("stevs run ") and f"/{fold}.json " in line:
            words = shlex.split(line.split(" > ")[0])
            method = words[words.index("--method") + 1]
            run_encoder = words[words.index("--out") + 1].split("/models/")[1].split("/")[0]
            found.setdefault(method, {})[run_encoder] = words[2:]
    runs = {}
    for method, by_encoder in found.items():
        if encoder in by_encoder:
            runs[method] = by_encoder[encoder]
        elif len(by_encoder) == 1:
            runs[method] = next(iter(by_encoder.values()))
    return runs


def retarget(words: list[str], out: Path) -> list[str]:
    """``words`` with --out, --predictions and --metrics under ``out``."""
    words = list(words)
    for flag in ("--out", "--predictions", "--metrics"):
        i = words.index(flag) + 1
        words[i] = str(out / flag.strip("-") / re.sub(r"^.*?/(models|predictions|metrics)/",
                                                      "", words[i]))  # fmt: skip
    return words


def run_once(tree: Path, words: list[str], out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `stevs run` from the package in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, "-P", "-m", "stevs.cli", "run", *retarget(words, out)]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=log, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fingerprint(folder: Path) -> dict[str, str]:
    """A digest of every file a run wrote (h5ad: its arrays; logs left out)."""
    import anndata as ad
    import numpy as np

    prints = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".log"):
        digest = hashlib.sha256()
        if path.suffix == ".h5ad":
            adata = ad.read_h5ad(path)
            for array in (adata.X, *adata.layers.values()):
                digest.update(np.ascontiguousarray(array).tobytes())
        elif path.name not in ("config.json", "metrics.csv", "train.log"):
            digest.update(path.read_bytes())  # config/metrics hold paths and seconds
        prints[str(path.relative_to(folder))] = digest.hexdigest()
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--fold", default="fold0")
    parser.add_argument("--encoder", help="the encoder of the runs, where a method has several")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--configfile", nargs="+", required=True)
    parser.add_argument("--config", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    runs = planned_runs(args.configfile, args.config, args.fold, args.encoder)
    missing = [m for m in args.methods if m not in runs]
    if missing:
        parser.error(
            f"no single stevs run of {missing} on {args.fold} in the plan (a method on "
            "several encoders needs --encoder)"
        )
    print("| method | before wall s | after wall s | before CPU s | after CPU s | CPU ratio "
          "| same files |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="run_cost_") as scratch:
        for method in args.methods:
            seconds: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for repeat in range(args.repeats):
                for name, tree in (("before", args.before.resolve()), ("after", REPO)):
                    out = Path(scratch) / f"{method}_{name}_{repeat}"
                    seconds[name].append(run_once(tree, runs[method], out))
            same = all(
                fingerprint(Path(scratch) / f"{method}_before_{r}")
                == fingerprint(Path(scratch) / f"{method}_after_{r}")
                for r in range(args.repeats)
            )
            b_wall, b_cpu = (sum(v) / args.repeats for v in zip(*seconds["before"], strict=True))
            a_wall, a_cpu = (sum(v) / args.repeats for v in zip(*seconds["after"], strict=True))
            print(f"| `{method}` | {b_wall:.1f} | {a_wall:.1f} | {b_cpu:.1f} | {a_cpu:.1f} | "
                  f"{a_cpu / b_cpu:.2f} | {'yes' if same else 'NO'} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
