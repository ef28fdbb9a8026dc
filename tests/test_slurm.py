"""The workflow on a real Slurm cluster: `make test-slurm`.

A single-node Slurm (munged, MariaDB, slurmdbd, slurmctld, slurmd; .ci/slurm_cluster.sh)
runs on this machine; the tiny `.test/` workflow goes through `--profile profiles/slurm`
with the overlay `.test/slurm` and the cluster's own partitions. A method's train, predict
and evaluate on a fold are one job (`run_fold`, `stevs run`; every seed of a seeded method
in it), so `sacct` must list one completed Slurm job per planned job, each run_fold job
having run its own method and fold (its sbatch line's `--target-jobs`). While it runs,
the job of one STevs run is cancelled (`scancel`) once its training has started; Snakemake
must resubmit it with twice the memory and minutes (profiles/slurm: retries) and finish.
Forcing one fold's model to retrain must submit that run's job and nothing else.

Minutes, not seconds, and it needs root to install Slurm (apt-get), so it is not part of
the default suite: ``make test-slurm`` runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "slurm_cluster.sh"
CONFIG = ROOT / ".test" / "config" / "config.yaml"
BIN = Path(sys.executable).parent
#: rules of .test/'s default target that run as Slurm jobs (write_config is a localrule)
RULES = (
    "make_demo",
    "ingest_slide",
    "tile_slide",
    "make_folds",
    "run_fold",
    "run_fold_unseeded",
    "report",
    "predict_slide",
)
#: the rules of a method's runs on a fold (every seed of a seeded method in one job) and the
#: start of their jobs' comments (the plugin's rule_NAME_wildcards_{values joined by _})
RUN_RULES = ("run_fold", "run_fold_unseeded")
RUN_COMMENT = "rule_run_fold"
FOLD0_RUN = "encoder=cpu_small,method=stevs,fold=fold0"
FOLD0_MODEL = ".test/results/models/cpu_small/stevs/seed0/fold0/model.safetensors"
FOLD0_METRICS = ".test/results/metrics/cpu_small/stevs/seed0/fold0.tsv"

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """The environment of a running single-node cluster (SLURM_CONF); stopped afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "SLURM_CONF": str(state / "slurm.conf"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    try:
        # inside the try: a start that fails half-way stops the daemons it did start
        subprocess.run([str(SCRIPT), "start", str(state)], check=True, timeout=180)
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], timeout=120)


def snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """The .test workflow in ``workdir`` through the SLURM profile and the test overlay."""
    partitions = workdir / "partitions.yaml"
    if not partitions.exists():
        generate = [str(BIN / "generate-slurm-partition-config"), "-o", str(partitions)]
        subprocess.run(generate, check=True, env=env, timeout=60)
    argv = [str(BIN / "snakemake"), *args, "-s", str(ROOT / "Snakefile")]
    argv += ["--directory", str(workdir), "--profile", str(ROOT / "profiles" / "slurm")]
    argv += ["--profile", str(ROOT / ".test" / "slurm")]
    argv += ["--slurm-partition-config", str(partitions), "--configfile", str(CONFIG)]
    log = workdir / f"snakemake-{time.time_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen, timeout: float) -> str:
    """Wait for Snakemake; its log, asserting it succeeded."""
    code = process.wait(timeout=timeout)
    log = process.log.read_text()
    assert code == 0, log[-4000:]
    return log


def sacct(env: dict[str, str]) -> list[dict[str, str]]:
    """Every job the cluster's accounting holds (allocations only, not steps)."""
    fields = ("JobID", "State", "Comment", "ReqMem", "AllocCPUS", "Timelimit", "Partition")
    fields += ("SubmitLine",)  # last: the sbatch line may hold a "|"
    argv = ["sacct", "-a", "-X", "-n", "-P", "-S", "2000-01-01", "-o", ",".join(fields)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    split = len(fields) - 1
    return [dict(zip(fields, line.split("|", split), strict=True)) for line in out.splitlines()]


def targets(command: str | dict[str, str]) -> frozenset[tuple[str, str]]:
    """(rule, wildcards) of the jobs a Slurm job ran: the `--target-jobs` of its command (a
    sacct row's SubmitLine, the sbatch line), as in
    `--target-jobs 'run_fold:encoder=cpu_small,method=stevs,fold=fold0'`."""
    if isinstance(command, dict):
        command = command["SubmitLine"]
    found = re.findall(r"\b(\w+):((?:\w+=[\w.-]+,?)+)", command)
    return frozenset((rule, wildcards.rstrip(",")) for rule, wildcards in found if rule in RULES)


def run_of(command: str | dict[str, str]) -> str:
    """The wildcards of the run a run_fold job ran, asserting it ran that one job only."""
    ran = targets(command)
    assert len(ran) == 1, command
    ((rule, run),) = ran
    assert rule in RUN_RULES, command
    return run


def rule_of(comment: str) -> str:
    """The rule of a job from the comment the SLURM plugin gives it (rule_NAME[_wildcards_...])."""
    name = comment.removeprefix("rule_").split("_wildcards_")[0]
    assert name in RULES, comment
    return name


def cancel_a_training_job(workdir: Path, env: dict[str, str], process: subprocess.Popen) -> str:
    """scancel the first job of a STevs run seen running, once its training has started (the
    model folder's train.log has lines); its Slurm job id."""
    deadline = time.monotonic() + 1200
    checked = set()
    while time.monotonic() < deadline and process.poll() is None:
        argv = ["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"]
        out = subprocess.run(argv, capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            job_id, comment = line.split("|", 1)
            if not comment.startswith(RUN_COMMENT) or job_id in checked:
                continue
            # the job's batch script (sbatch --wrap's command): sacct may not list it yet;
            # none once the job has ended
            argv = ["scontrol", "write", "batch_script", job_id, "-"]
            script = subprocess.run(argv, capture_output=True, text=True, env=env).stdout
            checked.add(job_id)
            if not script:
                continue
            run = run_of(script)
            if run.startswith("encoder=cpu_small,method=stevs,"):
                fold = run.rsplit("=", 1)[-1]
                log = workdir / f".test/results/models/cpu_small/stevs/seed0/{fold}/train.log"
                while process.poll() is None and not (log.exists() and log.stat().st_size):
                    time.sleep(0.2)
                subprocess.run(["scancel", job_id], check=True, env=env)
                return job_id
        time.sleep(0.5)
    pytest.fail("no STevs training job was seen running")


@pytest.fixture(scope="module")
def finished_run(cluster, tmp_path_factory) -> tuple[Path, str, str]:
    """(working folder, Snakemake's log, the cancelled job's id) of the whole .test run."""
    workdir = tmp_path_factory.mktemp("run")
    process = snakemake(workdir, cluster)
    try:
        cancelled = cancel_a_training_job(workdir, cluster, process)
        log = finish(process, timeout=1800)
    finally:
        stop(process)
    return workdir, log, cancelled


def stop(process: subprocess.Popen) -> None:
    """End a Snakemake that is still running (a failed or interrupted test)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def planned_jobs(workdir: Path, env: dict[str, str]) -> Counter:
    """Jobs per rule of a fresh .test run (a dry run in an empty folder)."""
    plan = workdir.parent / "plan"
    plan.mkdir(exist_ok=True)
    out = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-s", str(ROOT / "Snakefile"), "--directory", str(plan)]
        + ["--cores", "1", "--configfile", str(CONFIG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    ).stdout
    counts = Counter()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in RULES and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_every_job_ran_on_slurm_and_a_cancelled_one_was_retried(finished_run, cluster):
    workdir, _, cancelled = finished_run
    assert (workdir / ".test" / "results" / "report" / "index.html").is_file()
    jobs = sacct(cluster)
    completed = [j for j in jobs if j["State"] == "COMPLETED"]
    planned = planned_jobs(workdir, cluster)
    # one completed Slurm job per planned job, a run's train, predict and evaluate one job
    assert Counter(rule_of(j["Comment"]) for j in completed) == planned
    runs = [j for j in completed if j["Comment"].startswith(RUN_COMMENT)]
    assert len({run_of(j) for j in runs}) == len(runs) == sum(planned[r] for r in RUN_RULES) > 0
    assert {j["Partition"] for j in jobs} == {"local"}
    # the cancelled STevs run was resubmitted (attempt 2: twice the memory and minutes: the
    # largest memory of its three stages, their minutes summed) and finished
    first = next(j for j in jobs if j["JobID"] == cancelled)
    assert first["State"].startswith("CANCELLED") and first["Comment"].startswith(RUN_COMMENT)
    retried = [j for j in runs if targets(j) == targets(first)]
    assert len(retried) == 1 and int(retried[0]["JobID"]) > int(cancelled)
    # train 4000 MB (.test config) / 30 min, predict (torch) 8000 MB / 60, evaluate 4000 / 20
    assert (first["ReqMem"], retried[0]["ReqMem"]) == ("8000M", "16000M")
    assert (first["Timelimit"], retried[0]["Timelimit"]) == ("01:50:00", "03:40:00")
    # what the rules ask for reaches Slurm: a ridge floor's run the 8000 MB of its training,
    # 1 CPU, 60 + 30 + 20 minutes
    ridge = [j for j in runs if "method=ridge_color" in run_of(j)]
    assert [(j["ReqMem"], j["AllocCPUS"], j["Timelimit"]) for j in ridge] == [
        ("8000M", "1", "01:50:00")
    ] * 2


def test_rerunning_one_fold_submits_only_its_jobs(finished_run, cluster):
    workdir, _, _ = finished_run
    before = max(int(j["JobID"]) for j in sacct(cluster))
    process = snakemake(workdir, cluster, FOLD0_METRICS, "--forcerun", FOLD0_MODEL)
    try:
        finish(process, timeout=900)
    finally:
        stop(process)
    new = [j for j in sacct(cluster) if int(j["JobID"]) > before]
    assert [j["State"] for j in new] == ["COMPLETED"]
    assert run_of(new[0]) == FOLD0_RUN
