"""The Snakemake workflow: lint, formatting, dry runs, and bad sample sheets stop early."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import Plan, run_snakemake

from stevs.metrics import PER_GENE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = ROOT / "config" / "demo.yaml"
#: the rules of a method's runs on a fold (train, predict, evaluate; seeded methods every
#: seed in one job, the others seed 0)
RUN_RULES = ("run_fold", "run_fold_unseeded")


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if "--configfile" not in args:
        args = (*args, "--configfile", str(DEMO))
    return run_snakemake(*args, cwd=cwd)


def test_snakemake_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_snakefmt_check_passes():
    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "stevs", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_plans_the_whole_dag(demo_plan: Plan):
    for rule in (
        "make_demo",
        "ingest_slide",
        "tile_slide",
        "make_folds",
        "embed_slide",
        "run_fold",
        "run_fold_unseeded",
        "report",
    ):
        assert f"rule {rule}:" in demo_plan.stdout, rule


def test_slurm_profile_dry_run(tmp_path):
    result = snakemake("-n", "--profile", str(ROOT / "profiles" / "slurm"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run_fold" in result.stdout


def _resources(job: dict[str, str]) -> dict[str, str]:
    """A dry-run job's `resources:` line as a mapping."""
    pairs = (item.partition("=") for item in job.get("resources", "").split(", ") if item)
    return {key: value for key, _, value in pairs}


def test_slurm_jobs_ask_what_they_need(tmp_path):
    """Through profiles/slurm: a GPU for the jobs that run a network and for no other, the
    threads the config asks for, the rule's memory, and no partition or CPU count of the
    profile's own (partitions.yaml picks the partition, the threads are the CPUs)."""
    overlay = tmp_path / "gpu.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "methods": ["stevs", "ridge_color", "ridge_embed"],
                "encoders": [
                    {"preset": "cpu_small", "freeze": False, "methods": ["stevs"]},
                    {"preset": "effnet_lite0_in1k", "freeze": True, "methods": ["ridge_embed"]},
                ],
                "resources": {"gpu": 1, "threads": 16, "train_mem_mb": 12345},
            }
        )
    )
    test_config = str(ROOT / ".test" / "config" / "config.yaml")
    profile = str(ROOT / "profiles" / "slurm")
    # a dry run caps threads at --cores (1 when not given); a SLURM run has no such cap
    # unless a profile sets `cores` (test_default_profile_leaves_the_slurm_profile_alone)
    result = snakemake(
        "-n",
        "--cores",
        "64",
        "--profile",
        profile,
        "--configfile",
        test_config,
        str(overlay),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    network = {"embed_slide", "predict_slide"}
    seen = set()
    for job in jobs:
        resources, rule = _resources(job), job["rule"]
        method = job.get("wildcards", "").partition("method=")[2].split(",")[0]
        if rule in RUN_RULES:
            assert resources["gpu"] == ("1" if method == "stevs" else "0"), job
            assert job["threads"] == "16", job
            seen.add(("run_fold", method))
        elif rule in network:
            assert resources["gpu"] == "1", job
            seen.add((rule, ""))
        else:
            assert resources.get("gpu", "0") == "0", job
        if rule in RUN_RULES:  # the largest of train's, predict's and evaluate's memory
            assert resources["mem_mb"] == ("12345" if method == "stevs" else "8000"), job
        assert "slurm_partition" not in resources and "cpus_per_task" not in resources, job
    assert {("run_fold", m) for m in ("stevs", "ridge_color", "ridge_embed")} | {
        (r, "") for r in network
    } == seen


def test_slurm_submits_one_job_per_run(tmp_path):
    """One Slurm job per run and fold (`run_fold`: train, predict and evaluate in one
    process), asking for the largest memory of the three stages and the sum of their minutes
    (a torch run a GPU, a ridge run none), doubled on the retry. A fake `sbatch` records each
    call and refuses the job; every other output is in place, so forcing two models submits
    only their runs' jobs."""
    overlay = tmp_path / "gpu.yaml"
    resources = {"gpu": 1, "threads": 16, "train_mem_mb": 12345, "train_runtime": 45}
    overlay.write_text(yaml.safe_dump({"resources": resources}))
    configs = ("--configfile", str(ROOT / ".test" / "config" / "config.yaml"), str(overlay))
    plan = snakemake("-n", *configs, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    for job in _jobs(plan.stdout):
        for output in filter(None, job["output"].split(", ")):
            (tmp_path / output).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / output).touch()
    calls = tmp_path / "sbatch.log"
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexit 1\n')
    sbatch.chmod(0o755)
    # no account in the profile: the plugin guesses one with sacct (here: none found), which
    # a machine without Slurm lacks
    sacct = sbatch.parent / "sacct"
    sacct.write_text("#!/bin/sh\nexit 0\n")
    sacct.chmod(0o755)
    runs = {"stevs": "cpu_small/stevs/seed0/fold0", "ridge_color": "none/ridge_color/seed0/fold0"}
    env = {
        **os.environ,
        "PATH": f"{sbatch.parent}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    argv = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path)]
    argv += [f".test/results/metrics/{run}.tsv" for run in runs.values()]
    argv += ["--forcerun"] + [
        f".test/results/models/{run}/model.safetensors" for run in runs.values()
    ]
    # the test cluster's overlay: no account, the first status check after 3 s, not 40
    profiles = (ROOT / "profiles" / "slurm", ROOT / ".test" / "slurm")
    argv += [arg for profile in profiles for arg in ("--profile", str(profile))]
    partitions = ROOT / "profiles" / "slurm" / "partitions.yaml"
    # --keep-going: both runs' retries are submitted, not only the first to fail twice
    argv += ["--slurm-partition-config", str(partitions), "--keep-going", *configs]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and calls.is_file(), result.stdout + result.stderr
    asked = {}
    for call in calls.read_text().splitlines():
        options, _, command = call.partition("--wrap=")
        # the job's own Snakemake runs the one run_fold job: --target-jobs 'rule:...'
        ran = re.findall(r"'(\w+):encoder=\w+,method=(\w+),", command)
        ((rule, method),) = ran
        assert rule in RUN_RULES and f"--comment rule_{rule}_wildcards_" in options, call
        attempt = int(re.search(r"--attempt (\d+)", command)[1])
        request = r"-p \w+|-t \d+|--mem \d+|--cpus-per-task=\d+|--gpus=\S+"
        asked[method, attempt] = " ".join(re.findall(request, options))
    # train 45 min / 12345 MB; predict (torch) 60 / 8000, (ridge) 30 / 4000; evaluate 20 / 4000
    assert asked == {
        ("stevs", 1): "-p gpu -t 125 --mem 12345 --cpus-per-task=16 --gpus=1",
        ("stevs", 2): "-p gpu -t 250 --mem 24690 --cpus-per-task=16 --gpus=1",
        ("ridge_color", 1): "-p cpu -t 110 --mem 8000 --cpus-per-task=16",
        ("ridge_color", 2): "-p cpu -t 220 --mem 16000 --cpus-per-task=16",
    }


def test_default_profile_leaves_the_slurm_profile_alone():
    """profiles/default is merged into every run and wins key by key: it must not set what
    the SLURM profile sets, nor `cores` (which caps every job's threads at this host's cores)."""
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert not {"cores", "jobs", "default-resources", "set-resources", "set-threads"} & set(default)
    assert all(slurm[key] == default[key] for key in set(default) & set(slurm))


def test_partitions_send_network_jobs_to_the_gpu_partition():
    """The SLURM plugin's partition choice with profiles/slurm/partitions.yaml: a job with a
    `gpu` goes to the GPU partition, one without to the CPU partition."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    partitions = read_partition_file(ROOT / "profiles" / "slurm" / "partitions.yaml")
    logger = SimpleNamespace(info=print, warning=print, debug=print)

    def best(gpu: int) -> str:
        resources = {"gpu": gpu, "mem_mb": 8000, "runtime": 60}
        job = SimpleNamespace(name="run_fold", threads=4, resources=resources)
        return get_best_partition(partitions, job, logger)

    assert (best(1), best(0)) == ("gpu", "cpu")


def _config(tmp_path: Path, sheet: Path, **folds) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    config["samples"] = str(sheet)
    config["demo"]["generate"] = False
    config["folds"].update(folds)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sheet(tmp_path: Path, rows: list[dict], drop: str | None = None) -> Path:
    (tmp_path / "img.png").write_bytes(b"x")
    (tmp_path / "outs").mkdir(exist_ok=True)
    table = pd.DataFrame(rows)
    if drop:
        table = table.drop(columns=[drop])
    path = tmp_path / "samples.tsv"
    table.to_csv(path, sep="\t", index=False)
    return path


ROW = {
    "patient": "P1",
    "image": "img.png",
    "expression": "outs",
    "format": "visium",
    "spots": "",
    "mpp": "",
}


@pytest.mark.parametrize(
    ("rows", "drop", "folds", "message"),
    [
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW, "patient": "P2"}],
            "format",
            {},
            "missing column(s) format",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "a", **ROW, "patient": "P2"}],
            None,
            {},
            "row 3 (slide 'a'): duplicate slide_id",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW, "image": "nope.svs"}],
            None,
            {},
            "row 3 (slide 'b'): image",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW}],
            "patient",
            {"scheme": "leave_one_patient_out"},
            "column 'patient' is missing",
        ),
        (
            [{"slide_id": "a", **ROW}, {"slide_id": "b", **ROW}],
            None,
            {"scheme": "leave_one_patient_out"},
            "leave_one_patient_out needs at least 2 patients",
        ),
    ],
)
def test_bad_sample_sheet_stops_before_running(tmp_path, rows, drop, folds, message):
    config = _config(tmp_path, _sheet(tmp_path, rows, drop), **folds)
    result = snakemake("-n", "--cores", "1", "--configfile", str(config), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output, output
    assert "samples.tsv" in output
    assert not (tmp_path / "results").exists()


def _jobs(dry_run_stdout: str) -> list[dict[str, str]]:
    """The jobs of a `snakemake -n` listing: rule, input, output (wildcards, threads and
    resources where listed; a group job's members are indented)."""
    jobs = []
    for block in dry_run_stdout.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        head = [line for line in lines if line.startswith(("rule ", "localrule "))]
        if not head:
            continue
        job = {"rule": head[0].split()[-1].rstrip(":"), "input": "", "output": ""}
        for line in lines:
            key, _, value = line.strip().partition(": ")
            if key in ("input", "output", "wildcards", "threads", "resources", "priority"):
                job[key] = value
        jobs.append(job)
    return jobs


def test_long_runs_are_queued_first(demo_plan: Plan):
    """run_fold priorities, longest first: runs that train encoder weights (the trainable
    cpu_small encoder) before frozen-encoder torch runs, before the ridge probes; the jobs
    that make their inputs before all of them."""
    frozen = "effnet_lite0_in1k-frozen"
    expected = {
        ("cpu_small", "stevs"): "2",
        ("cpu_small", "stnet"): "2",
        (frozen, "stevs"): "1",
        (frozen, "ridge_rrr"): "0",
        ("none", "ridge_color"): "0",
    }
    seen = {}
    for job in (j for j in _jobs(demo_plan.stdout) if j["rule"] in RUN_RULES):
        wildcards = dict(w.split("=") for w in job["wildcards"].split(", "))
        seen[wildcards["encoder"], wildcards["method"]] = job.get("priority", "0")
    assert {key: seen.get(key) for key in expected} == expected
    # the runs' inputs before every run: a long run never waits for an input queued behind
    # shorter runs (its embeddings, its slides)
    inputs = {"ingest_slide", "tile_slide", "embed_slide", "make_folds"}
    input_priorities = {
        job.get("priority", "0") for job in _jobs(demo_plan.stdout) if job["rule"] in inputs
    }
    assert input_priorities and all(int(p) > max(map(int, seen.values())) for p in input_priorities)


def test_fold_jobs_read_only_the_folds_slides(demo_plan: Plan):
    """A run_fold job reads its fold's slides (train and val to train on, test to predict and
    score), their patch caches, and for a frozen encoder their embedding caches: no others."""
    from stevs.fold_plan import plan_folds

    ids = [f"demo_{i}" for i in range(1, 7)]
    plans = {
        p.name: p for p in plan_folds("leave_one_patient_out", ids, ["P1", "P2"] * 3, k=3, seed=0)
    }
    checked = 0
    for job in (j for j in _jobs(demo_plan.stdout) if j["rule"] in RUN_RULES):
        fold = next(f for f in plans if f"/{f}" in job["output"])
        wanted = {*plans[fold].train, *plans[fold].val, *plans[fold].test}
        inputs = job["input"].split(", ")
        adatas = {Path(i).stem for i in inputs if i.startswith("results/slides/")}
        patches = {Path(i).stem for i in inputs if i.startswith("results/patches/")}
        embeddings = {Path(i).stem for i in inputs if i.startswith("results/embeddings/")}
        frozen = "effnet_lite0_in1k-frozen/" in job["output"]
        assert adatas == patches == wanted, job
        assert embeddings == (wanted if frozen else set()), job
        assert f"results/folds/{fold}.json" in inputs
        outputs = job["output"].split(", ")
        assert sum(o.endswith(("model.safetensors", "predictions.tsv")) for o in outputs) == 2
        checked += 1
    # 2 folds x (stevs, stnet on cpu_small + stevs, stnet, ridge_embed, ridge_context,
    # ridge_rrr on the frozen EfficientNet + ridge_color), one seed
    assert checked == 16


def test_threads_per_job_come_from_the_config(demo_plan: Plan):
    """config/demo.yaml: 1 thread per job (an overlay's 3: the seeds test below)."""
    lines = demo_plan.stdout.splitlines()
    commands = [line for line in lines if "stevs run " in line]
    assert commands and all("--threads 1" in line for line in commands)


def test_report_reads_only_this_configs_metrics(demo_plan: Plan, tmp_path):
    """The report job's command names exactly this config's per-gene tables (`--only`), and
    the report, given them, reads none of a stale run's tables beside them."""
    from stevs.report import collect_metrics

    command = next(
        line.removeprefix("Shell command: ")
        for line in demo_plan.stdout.splitlines()
        if "stevs report" in line
    )
    metrics = [j for j in _jobs(demo_plan.stdout) if j["rule"] == "report"][0]["input"]
    wanted = sorted(p for p in metrics.split(", ") if p.startswith("results/metrics/"))
    assert len(wanted) == 3 * 2 * 8  # table, summary, pooled x folds x runs
    tables = [p for p in wanted if not p.endswith((".summary.tsv", ".pooled.tsv"))]
    words = shlex.split(command)
    only = words[words.index("--only") + 1 : words.index("--predictions")]
    assert sorted(only) == tables
    for path in wanted:  # minimal tables of each run, then a stale run beside them
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        kind = "summary" if path.endswith(".summary.tsv") else "gene"
        (tmp_path / path).write_text(_MINIMAL[kind])
    stale = tmp_path / "results" / "metrics" / "cpu_small" / "stevs_concat" / "seed0"
    stale.mkdir(parents=True)
    (stale / "fold0.summary.tsv").write_text("an earlier config's run")
    (stale / "fold0.tsv").write_text("an earlier config's run")
    _, folds, _ = collect_metrics(tmp_path / "results" / "metrics", [tmp_path / t for t in only])
    assert sorted(folds["run"].unique()) == sorted({t.split("/", 2)[2].rsplit("/", 1)[0]
                                                    for t in tables})  # fmt: skip
    assert len(folds) == len(tables)


_MINIMAL = {
    "summary": "method\tfold\tprotocol\tpearson_r_mean_headline\nm\tfold0\tstevs\t0.5\n",
    "gene": "\t".join(PER_GENE_COLUMNS) + "\nm\tfold0\ts\tg\t0.5\t0.5\t1\t1\t0.9\tTrue\tFalse\t9\n",
}


def test_readme_forcerun_example_retrains_one_fold(tmp_path):
    """The README's retrain command plans that fold's jobs only (the target is not swallowed
    by --forcerun, which takes any number of rules or files)."""
    readme = (ROOT / "README.md").read_text()
    lines = [
        line
        for line in readme.splitlines()
        if line.startswith("snakemake ") and ("--forcerun" in line or " -R " in line)
    ]
    assert lines, "README has no --forcerun example"
    command = lines[0].split("#")[0].split()
    assert command[:3] == ["snakemake", "--cores", "4"], command
    assert command[-2:] == ["--configfile", "config/demo.yaml"], command  # ends --forcerun
    args = [str(ROOT / a) if a.startswith("config/") else a for a in command[3:]]
    result = snakemake("-n", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    fold_jobs = [j for j in jobs if j["rule"] in (*RUN_RULES, "report")]
    assert [j["rule"] for j in fold_jobs] == ["run_fold"], fold_jobs
    # that fold alone: no other fold, method or encoder (and no embeddings: cpu_small trains
    # on patches)
    assert all("cpu_small/stevs/seed0/fold0" in j["output"] for j in fold_jobs), fold_jobs
    assert "results/models/cpu_small/stevs/seed0/fold0/model.safetensors" in " ".join(command)
    # (from an empty folder, also the stages before it; never another fold or the report)
    assert {j["rule"] for j in jobs} <= {
        "make_demo", "write_config", "ingest_slide", "tile_slide", "make_folds", "run_fold",
    }  # fmt: skip


def test_seeds_encoders_embeddings_and_refit_in_the_plan(tmp_path):
    """Deep methods run per seed and encoder, ridge once; the frozen pretrained encoder's
    embeddings are one job per slide, read by its training and prediction jobs; the jobs'
    threads come from the config."""
    overlay = tmp_path / "seeds.yaml"
    overlay.write_text(
        "training:\n  seeds: [0, 1, 2]\nembeddings:\n  view: dihedral8\nresources:\n  threads: 3\n"
    )
    base = str(DEMO)  # --cores 4: a job gets at most --cores threads
    result = snakemake("-n", "-p", "--cores", "4", "--configfile", base, str(overlay),
                       cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    embed = sorted(j["output"] for j in jobs if j["rule"] == "embed_slide")
    assert embed == [f"results/embeddings/effnet_lite0_in1k/dihedral8/demo_{i}.h5"
                     for i in range(1, 7)]  # fmt: skip
    runs = [j for j in jobs if j["rule"] in RUN_RULES]
    assert len(runs) == 2 * (2 + 2 + 4)  # folds x (torch runs, every seed in one job + ridges)
    trained = [o for j in runs for o in j["output"].split(", ") if o.endswith(".safetensors")]
    assert len(trained) == 2 * (3 * (2 + 2) + 4)  # folds x (seeds x torch runs + ridges)
    assert {o.split("/")[4] for o in trained if "/stevs/" in o} == {"seed0", "seed1", "seed2"}
    assert not [o for o in trained if "ridge" in o and "/seed0/" not in o]
    lines = result.stdout.splitlines()
    frozen = next(x for x in lines if "stevs run " in x and "effnet_lite0_in1k-frozen/stevs/" in x)
    assert "--preset effnet_lite0_in1k --freeze-backbone --refit" in frozen
    assert "--embeddings results/embeddings/effnet_lite0_in1k/dihedral8" in frozen
    assert "--embedding-view dihedral8" in frozen and "--seeds 0 1 2 " in frozen
    scratch = next(x for x in lines if "stevs run " in x and "cpu_small/stevs/seed{seed}/" in x)
    assert "--seeds 0 1 2 " in scratch and "--refit" in scratch and "--embeddings" not in scratch
    ridge = next(x for x in lines if "stevs run " in x and "ridge_embed" in x)
    assert "--backbone effnet_lite0_in1k" in ridge and "--refit" not in ridge
    assert "--seeds 0 " in ridge  # no seed of its own: one run
    predict = next(x for x in lines if "stevs run " in x and "-frozen/stnet/" in x)
    assert "--embeddings results/embeddings/effnet_lite0_in1k/dihedral8" in predict
    commands = [x for x in lines if "stevs run " in x]
    assert all("--threads 3" in x for x in commands)  # resources.threads


def test_stevs_tail_reads_the_tail_view_per_seed_and_the_probes_the_config_view(tmp_path):
    """stevs_tail: one run per seed on the frozen encoder, training and predicting from the
    `tail` embedding caches (one embed job per slide), beside the probes' config view."""
    overlay = tmp_path / "tail.yaml"
    overlay.write_text(
        "methods: [stevs_tail, ridge_embed]\ntraining:\n  seeds: [0, 1]\nencoders:\n"
        "  - {preset: effnet_lite0_in1k, freeze: true, methods: []}\n"
    )
    result = snakemake("-n", "-p", "--cores", "1", "--configfile", str(DEMO), str(overlay),
                       cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    embed = {j["output"].split("/")[3] for j in jobs if j["rule"] == "embed_slide"}
    assert embed == {"none", "tail"}
    runs = [o for j in jobs if j["rule"] in RUN_RULES for o in j["output"].split(", ")]
    trained = [o for o in runs if "/stevs_tail/" in o and o.endswith(".safetensors")]
    assert {o.split("/")[4] for o in trained} == {"seed0", "seed1"}
    lines = result.stdout.splitlines()
    tail = next(x for x in lines if "stevs run " in x and "/stevs_tail/" in x)
    assert "--embeddings results/embeddings/effnet_lite0_in1k/tail" in tail
    ridge = next(x for x in lines if "stevs run " in x and "ridge_embed" in x)
    assert "--embeddings results/embeddings/effnet_lite0_in1k/none" in ridge


GEOMETRY_OVERLAY = """
encoders:
  - {preset: cpu_small, freeze: false, methods: []}
  - {preset: effnet_lite0_in1k, freeze: true, patch_px: preset, patch_um: preset,
     methods: [stevs, ridge_embed]}
  - {preset: swin_t, freeze: false, patch_px: 224, patch_um: 112.0, methods: [stevs]}
predict_slides:
  sheet: resources/demo/predict.tsv
  model: stevs
"""


def test_each_encoder_reads_its_own_patch_geometry_tiled_once(tmp_path):
    """cpu_small on the tiling: geometry (64 px, 128 µm), the frozen EfficientNet (its preset's
    224 px at 0.5 µm/px) and swin_t (224 px, 112 µm, stated): the 224 px geometry is tiled
    once per slide, into its own folder, for both; each encoder's embed, train and predict
    jobs read its geometry's caches (ridge_color, encoder none, the tiling's)."""
    overlay = tmp_path / "geometry.yaml"
    overlay.write_text(GEOMETRY_OVERLAY)
    result = snakemake("-n", "-p", "--cores", "1", "--configfile", str(DEMO), str(overlay),
                       cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs, lines = _jobs(result.stdout), result.stdout.splitlines()
    slides = [f"demo_{i}" for i in range(1, 7)]
    tiles = sorted(j["output"].split(", ")[0] for j in jobs if j["rule"].startswith("tile_"))
    assert tiles == sorted([f"results/patches/{s}.h5" for s in slides]
                           + [f"results/patches/224px_112um/{s}.h5" for s in slides])  # fmt: skip
    tile_commands = [x for x in lines if "stevs tile " in x]
    assert sum("--patch-px 224 --patch-um 112 " in x and "/224px_112um/" in x
               for x in tile_commands) == 6  # fmt: skip
    assert sum("--patch-px 64 --patch-um 128 " in x and "/224px_112um/" not in x
               for x in tile_commands) == 6  # fmt: skip
    embed = [j for j in jobs if j["rule"].startswith("embed_")]
    assert sorted(j["input"] for j in embed) == [f"results/patches/224px_112um/{s}.h5"
                                                 for s in slides]  # fmt: skip
    assert {j["output"].rsplit("/", 1)[0] for j in embed} == {
        "results/embeddings/effnet_lite0_in1k/224px_112um/none"
    }
    for job in (j for j in jobs if j["rule"] in RUN_RULES):
        encoder = job["output"].split("/")[2]
        folder = "results/patches" + ("" if encoder in ("cpu_small", "none") else "/224px_112um")
        patches = {i.rsplit("/", 1)[0] for i in job["input"].split(", ") if "/patches/" in i}
        assert patches == {folder}, job
    runs = [x for x in lines if "stevs run " in x]
    assert all(("--patches-dir results/patches/224px_112um" in x)
               == ("swin_t/" in x or "-frozen/" in x) for x in runs)  # fmt: skip
    frozen = next(x for x in runs if "effnet_lite0_in1k-frozen/stevs/" in x)
    assert "--embeddings results/embeddings/effnet_lite0_in1k/224px_112um/none" in frozen
    # the H&E-only maps: the first stevs run's encoder (cpu_small), the tiling geometry
    predict_slide = next(x for x in lines if "stevs predict-slide" in x)
    assert "--patch-px" not in predict_slide


def test_the_he_only_maps_tile_at_the_models_encoder_geometry(tmp_path):
    """predict_slides.model on an encoder with its own geometry: predict-slide is told it."""
    overlay = tmp_path / "geometry.yaml"
    overlay.write_text(
        GEOMETRY_OVERLAY.replace("{preset: cpu_small, freeze: false, methods: []}",
                                 "{preset: cpu_small, freeze: false, methods: [ridge_color]}")
    )  # fmt: skip
    result = snakemake("-n", "-p", "--cores", "1", "--configfile", str(DEMO), str(overlay),
                       cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    predict_slide = next(x for x in result.stdout.splitlines() if "stevs predict-slide" in x)
    assert "results/models/effnet_lite0_in1k-frozen/stevs/seed0/fold1" in predict_slide
    assert "--patch-px 224 --patch-um 112 " in predict_slide


def test_the_default_geometry_keeps_its_paths(demo_plan: Plan):
    """Encoders without patch_px / patch_um read the tiling: section's caches, where they
    always were: no second tiling, no geometry folder, no --patches-dir."""
    jobs = _jobs(demo_plan.stdout)
    rules = {j["rule"] for j in jobs}
    assert "tile_slide_geometry" not in rules and "embed_slide_geometry" not in rules
    tiles = sorted(j["output"].split(", ")[0] for j in jobs if j["rule"] == "tile_slide")
    assert tiles == [f"results/patches/demo_{i}.h5" for i in range(1, 7)]
    runs = [x for x in demo_plan.stdout.splitlines() if "stevs run " in x]
    assert runs and not [x for x in runs if "--patches-dir" in x or "--patch-px" in x]
    assert "px_" not in demo_plan.stdout


def test_own_sheet_ingest_fixed_splits_and_the_export_target_dry_run(tmp_path):
    """A slide's ingest job depends on its own row's files (and the row's text), not on the
    whole sheet: editing another row re-ingests (and retiles) nothing else. Scheme fixed plans
    one fold from the sheet's split column; export_all plans a SpatialData store per test
    prediction, slide and nothing else."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(b"x")
        (tmp_path / f"outs_{name}").mkdir()
    rows = [
        {**ROW, "slide_id": s, "image": f"{s}.png", "expression": f"outs_{s}", "split": split}
        for s, split in (("a", "train"), ("b", "val"), ("c", "test"))
    ]
    sheet = tmp_path / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    config = _config(tmp_path, sheet, scheme="fixed")
    args = ("-n", "--cores", "1", "all", "export_all", "--configfile", str(config))
    result = snakemake(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = _jobs(result.stdout)
    ingest = {Path(j["output"]).stem: j["input"].split(", ") for j in jobs
              if j["rule"] == "ingest_slide"}  # fmt: skip
    assert ingest == {s: [str(tmp_path / f"{s}.png"), str(tmp_path / f"outs_{s}")] for s in "abc"}
    folds = [j for j in jobs if j["rule"] == "make_folds"]
    assert len(folds) == 1 and "--scheme fixed" in result.stdout
    assert f"--splits {sheet}" in result.stdout and str(sheet) in folds[0]["input"]
    trains = {Path(j["output"].split(", ")[0]).parts[-4] for j in jobs if j["rule"] in RUN_RULES}
    assert trains == {"stevs", "stnet", "ridge_embed", "ridge_context", "ridge_rrr", "ridge_color"}
    exports = sorted(j["output"] for j in jobs if j["rule"].startswith("export_") and j["output"])
    n_runs = sum(j["rule"] in RUN_RULES for j in jobs)  # (encoder, method, seed) runs of fold0
    assert len(exports) == n_runs + 3  # every run's prediction of test slide c, every slide
    assert "results/export/cpu_small/stevs/seed0/fold0/c.zarr" in exports
    assert "results/export/slides/a.zarr" in exports


def test_report_only_refuses_tables_outside_the_metrics_folder_or_missing(tmp_path):
    from stevs.errors import StevsInputError
    from stevs.report import collect_metrics

    (tmp_path / "metrics").mkdir()
    elsewhere = tmp_path / "elsewhere.tsv"
    elsewhere.write_text(_MINIMAL["gene"])
    with pytest.raises(StevsInputError, match="outside --metrics"):
        collect_metrics(tmp_path / "metrics", [elsewhere])
    with pytest.raises(StevsInputError, match="not found"):
        collect_metrics(tmp_path / "metrics", [tmp_path / "metrics" / "m" / "fold0.summary.tsv"])
