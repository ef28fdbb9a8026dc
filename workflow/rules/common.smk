"""Helpers shared by the rules: config and sample-sheet validation, slide and fold lists.

Snakemake parses the rules with the project's source tree on sys.path and needs only the
standard library, pandas, PyYAML and jsonschema (what Snakemake itself brings): the
`stevs` modules imported here are the light ones (tests/test_workflow_bare.py blocks
torch, scipy and the rest while planning). Every job runs the `stevs` command of its rule's
environment: the conda env (envs/stevs.yaml, `--sdm conda`), else the one of the Python
running Snakemake (its bin folder goes first on the jobs' PATH).
"""

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

# the checkout's package, whatever is installed where Snakemake runs
sys.path.insert(0, workflow.basedir)
# envs/stevs.post-deploy.sh installs this checkout into the conda env (Snakemake copies the
# env files to .snakemake/conda/, so the script cannot find the checkout from where it lies)
os.environ.update(STEVS_SOURCE=workflow.basedir)

from stevs.config_checks import (
    encoder_geometry,
    encoder_runs,
    format_um,
    geometry_id,
    in_schema_order,
    schema_problem,
    settings_problem,
    tiling_geometry,
)
from stevs.errors import StevsInputError
from stevs.fold_plan import plan_folds
from stevs.io.samples import hest_metadata_path, read_fixed_splits, read_sample_sheet
from stevs.methods import REGISTRY, names


def _jobs_run_this_pythons_stevs():
    """Without conda or a container, the jobs run the `stevs` beside the Python that runs
    Snakemake (`.venv/bin/snakemake` works without activating the venv): its bin folder goes
    first on the jobs' PATH (after bash's strict mode, Snakemake's default prefix)."""
    isolated = {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER}
    if isolated & set(workflow.deployment_settings.deployment_method):
        return
    bin_dir = str(Path(sys.executable).parent)
    if not shutil.which(
        "stevs", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    ):
        logger.warning(
            f"stevs is not installed beside {sys.executable} nor on PATH: jobs will fail;"
            " run `make install` (then .venv/bin/snakemake) or use --sdm conda"
        )
    quoted = shlex.quote(bin_dir).replace("{", "{{").replace("}", "}}")
    shell.prefix(f'set -euo pipefail; export PATH={quoted}:"$PATH"; ')


_jobs_run_this_pythons_stevs()

CONFIG_SCHEMA = "../schemas/config.schema.yaml"


with open(workflow.source_path(CONFIG_SCHEMA)) as _schema_file:
    _schema = yaml.safe_load(_schema_file)
# embedding views: the schema's enum (tests/test_config.py: the embedding cache's
# TEST_VIEWS) and the views methods read whatever the config's (the registry's)
VIEWS = _schema["properties"]["embeddings"]["properties"]["view"]["enum"] + sorted(
    {m.embedding_view for m in REGISTRY.values() if m.embedding_view}
)
# one line naming the problem, before any job (stevs.config_checks; defaults filled between)
_problem = schema_problem(config, _schema)
if _problem:
    raise WorkflowError(_problem)
validate(config, schema=CONFIG_SCHEMA)  # fills in the schema's defaults
_problem = settings_problem(config)
if _problem:
    raise WorkflowError(_problem)


# What this run really uses: every --configfile merged, --config overrides, the defaults.
# The write_config rule stores it as {results}/config.yaml (for the report's provenance);
# in the schema's key order, so the same settings always give the same text.
CONFIG_YAML = yaml.safe_dump(
    in_schema_order(config, _schema), sort_keys=False, default_flow_style=False
)

DEMO = config["demo"]["generate"]
DEMO_SHEET = str(Path(config["demo"]["out"]) / "samples.tsv")
SCHEME = config["folds"]["scheme"]
RESULTS = config["results"].rstrip("/")
METHODS = list(config["methods"])
RIDGE_METHODS = [m for m in METHODS if m in names("ridge")]


def _load_samples():
    """Slide ids and patients: from the validated sample sheet, or the demo's (known from
    the config, before and after make_demo writes its sheet: demo_1..n, patients P1/P2).
    """
    sheet = config["samples"]
    needs_patient = SCHEME in ("leave_one_patient_out", "group_kfold")
    if DEMO:
        ids = [f"demo_{i}" for i in range(1, config["demo"]["n_slides"] + 1)]
        patients = ["P1" if i % 2 else "P2" for i in range(1, len(ids) + 1)]
        return ids, patients
    try:
        table = read_sample_sheet(
            sheet, data_root=config["data_root"] or None, require_patient=needs_patient
        )
    except StevsInputError as err:
        raise WorkflowError(f"sample sheet: {err}") from None
    validate(table.drop(columns=["mpp"]), schema="../schemas/samples.schema.yaml")
    for _, row in table.iterrows():
        SAMPLE_ROWS[row["slide_id"]] = {
            column: "" if row[column] is None else str(row[column])
            for column in (
                "slide_id",
                "patient",
                "image",
                "expression",
                "format",
                "spots",
                "mpp",
            )
        }
    return list(table["slide_id"]), list(table["patient"])


# slide -> its sample-sheet row (paths resolved); empty for the demo
SAMPLE_ROWS = {}
SLIDES, PATIENTS = _load_samples()
# fold scheme fixed: folds.splits (a split table or HEST's splits/), "" = the sample sheet
SPLITS_PATH = config["folds"]["splits"] or config["samples"]
try:
    FOLD_PLANS = {
        plan.name: plan
        for plan in plan_folds(
            SCHEME,
            SLIDES,
            PATIENTS,
            k=config["folds"]["k"],
            seed=config["folds"]["seed"],
            splits=(
                read_fixed_splits(SPLITS_PATH, SLIDES) if SCHEME == "fixed" else None
            ),
        )
    }
except StevsInputError as err:
    raise WorkflowError(
        f"fold scheme '{SCHEME}' on {config['samples']}: {err}"
    ) from None
FOLDS = list(FOLD_PLANS)


def ingest_inputs(wildcards):
    """What one slide's ingest reads: its own row's image and expression files (for the
    demo: the sheet the demo rule makes). Not the sheet itself, so that editing or adding
    another row does not re-ingest (and retile) every slide; the row is a parameter."""
    if DEMO:
        return {"sheet": DEMO_SHEET}
    row = SAMPLE_ROWS[wildcards.slide]
    inputs = {
        column: row[column]
        for column in ("image", "expression", "spots")
        if row[column]
    }
    if (
        row["format"] == "hest"
    ):  # a HEST-1k sample's metadata/{id}.json (its pixel size)
        inputs["metadata"] = str(hest_metadata_path(Path(row["expression"])))
    return inputs


def ingest_row(wildcards):
    """The slide's sample-sheet row as text: a changed row re-ingests that slide only."""
    if DEMO:
        return ""
    return "\t".join(f"{k}={v}" for k, v in SAMPLE_ROWS[wildcards.slide].items())


# encoder id -> entry, and the (encoder, method, seed) runs (stevs.config_checks)
ENCODERS, RUNS = encoder_runs(config)
VIEW = config["embeddings"]["view"]
# Patch geometries (px, µm): the tiling: section's (caches {RESULTS}/patches/{slide}.h5) and
# each encoder's (its patch_px / patch_um; `none`, ridge_color, reads the tiling's); every
# other geometry is tiled once, into {RESULTS}/patches/{px}px_{um}um/ (rule
# tile_slide_geometry), shared by the encoders that read it
TILING = tiling_geometry(config)
GEOMETRIES = {name: encoder_geometry(entry, config) for name, entry in ENCODERS.items()}
#: geometry id -> geometry, of the encoders' geometries other than the tiling's
OTHER_GEOMETRIES = {geometry_id(g): g for g in GEOMETRIES.values() if g != TILING}


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDES)),
    fold="fold[0-9]+",
    method="|".join(map(re.escape, METHODS)),
    encoder="|".join(map(re.escape, [*ENCODERS, "none"])),
    seed="[0-9]+",
    view="|".join(map(re.escape, VIEWS)),
    # no other geometry: a pattern that matches nothing
    geometry="|".join(map(re.escape, OTHER_GEOMETRIES)) or "(?!)",


#: run path components: {encoder}/{method}/seed{seed}
RUN = "{encoder}/{method}/seed{seed}"
SEEDS = list(config["training"]["seeds"])


def run_seeds(method):
    """The training seeds of a method's runs: the config's for a seeded method, else 0."""
    return SEEDS if REGISTRY[method].seeded else [0]


def methods_pattern(seeded):
    """Wildcard pattern of the configured methods that are (or are not) seeded."""
    names = [m for m in METHODS if REGISTRY[m].seeded == seeded]
    return "|".join(map(re.escape, names)) or "(?!)"


def run_folder(wildcards):
    """{encoder}/{method}/seed{seed} of a run_fold job, '{seed}' left for `stevs run`."""
    return f"{wildcards.encoder}/{wildcards.method}/seed{{seed}}"


def run_outputs(seeds):
    """Outputs of a run_fold job: per seed, the model, the prediction list and the three
    evaluation tables (the per-gene table written last)."""
    patterns = {
        "models": "{results}/models/{run}/{{fold}}/model.safetensors",
        "predictions": "{results}/predictions/{run}/{{fold}}/predictions.tsv",
        "summaries": "{results}/metrics/{run}/{{fold}}.summary.tsv",
        "pooled": "{results}/metrics/{run}/{{fold}}.pooled.tsv",
        "tables": "{results}/metrics/{run}/{{fold}}.tsv",
    }
    return {
        name: [
            pattern.format(results=RESULTS, run=f"{{encoder}}/{{method}}/seed{seed}")
            for seed in seeds
        ]
        for name, pattern in patterns.items()
    }


def run_paths(pattern, runs=None):
    """`pattern` (with {run} and {fold}) for every run and fold."""
    return [
        pattern.format(run=f"{e}/{m}/seed{s}", fold=fold)
        for e, m, s in (RUNS if runs is None else runs)
        for fold in FOLDS
    ]


def all_metrics():
    """Every evaluation file of this config's runs and folds (`evaluate`'s outputs)."""
    return [
        path
        for suffix in (".tsv", ".summary.tsv", ".pooled.tsv")
        for path in run_paths(f"{RESULTS}/metrics/{{run}}/{{fold}}{suffix}")
    ]


def uses_embeddings(wildcards):
    """Whether a run reads the embedding cache (the registry's `reads_embeddings`): a
    probe of a frozen encoder, and frozen image runs on a pretrained encoder (a frozen
    random encoder depends on the seed: it embeds in-run).
    """
    from stevs.models.presets import PRESETS

    entry = ENCODERS.get(wildcards.encoder)
    if not entry:
        return False
    pretrained = PRESETS[entry["preset"]].backbone.weights != "none"
    return REGISTRY[wildcards.method].reads_embeddings(entry["freeze"], pretrained)


def run_view(method):
    """The embedding view a method's runs read: the registry's (`stevs_tail`: tail), else
    the config's `embeddings.view`."""
    return REGISTRY[method].embedding_view or VIEW


def own_geometry(encoder):
    """'' where an encoder (or `none`) reads the tiling geometry, else its id ('224px_112um',
    `stevs.config_checks.geometry_id`): the folder of its patch and embedding caches."""
    geometry = GEOMETRIES.get(encoder, TILING)
    return "" if geometry == TILING else geometry_id(geometry)


def patches_dir(encoder):
    """The folder of the patch caches an encoder's runs read ({slide}.h5 each)."""
    return os.path.join(RESULTS, *filter(None, ("patches", own_geometry(encoder))))


def patches_args(wildcards):
    """`--patches-dir DIR` of a run whose encoder reads another geometry than the tiling's
    (the fold file names the tiling's caches); '' otherwise."""
    if not own_geometry(wildcards.encoder):
        return ""
    return f"--patches-dir {patches_dir(wildcards.encoder)}"


def geometry_args(encoder):
    """`--patch-px N --patch-um U` of an encoder with its own geometry ('' otherwise):
    `stevs predict-slide`'s tiling of an H&E-only slide."""
    if not own_geometry(encoder):
        return ""
    px, um = GEOMETRIES[encoder]
    return f"--patch-px {px} --patch-um {format_um(um)}"


def embedding_dir(encoder, method):
    """The embedding caches of a frozen encoder: per preset, patch geometry and view."""
    parts = (
        "embeddings",
        ENCODERS[encoder]["preset"],
        own_geometry(encoder),
        run_view(method),
    )
    return os.path.join(RESULTS, *filter(None, parts))


def fold_slides(fold, split):
    """Slides of a fold that a stage reads: `fit` (train + val, for training), `test`, or
    `all` (the three)."""
    plan = FOLD_PLANS[fold]
    slides = {
        "fit": [*plan.train, *plan.val],
        "test": list(plan.test),
        "all": [*plan.train, *plan.val, *plan.test],
    }[split]
    return list(dict.fromkeys(slides))


def fold_inputs(split, patches=True):
    """Input function: the fold file plus its `split` slides' AnnDatas (and patch caches,
    and for a run on a frozen encoder their embedding caches)."""

    def inputs(wildcards):
        slides = fold_slides(wildcards.fold, split)
        files = {
            "fold": f"{RESULTS}/folds/{wildcards.fold}.json",
            "adatas": expand(f"{RESULTS}/slides/{{slide}}.h5ad", slide=slides),
        }
        if patches:  # the encoder's geometry (no encoder: the tiling's)
            folder = patches_dir(wildcards.get("encoder", "none"))
            files["patches"] = expand(f"{folder}/{{slide}}.h5", slide=slides)
        if patches and "encoder" in wildcards.keys() and uses_embeddings(wildcards):
            folder = embedding_dir(wildcards.encoder, wildcards.method)
            files["embeddings"] = expand(f"{folder}/{{slide}}.h5", slide=slides)
        return files

    return inputs


def embedding_args(wildcards):
    """`--embeddings DIR --embedding-view V` of a run that reads the embedding cache."""
    if not uses_embeddings(wildcards):
        return ""
    folder = embedding_dir(wildcards.encoder, wildcards.method)
    return f"--embeddings {folder} --embedding-view {run_view(wildcards.method)}"


def training_args(wildcards):
    """Command-line options of `stevs train` for a method's runs (not the seed), from the
    config.

    Torch methods get every training option, the encoder's preset and its freeze flag;
    ridge methods only those they use (device, and for a probe of a frozen encoder
    the encoder), so a new `training.epochs` does not refit the ridge baselines.
    """
    training = config["training"]
    method = wildcards.method
    args = [
        f"--device {shlex.quote(training['device'])}",
        embedding_args(wildcards),
        patches_args(wildcards),
    ]
    if method in RIDGE_METHODS:
        if REGISTRY[method].encoder == "frozen":
            args.append(f"--backbone {ENCODERS[wildcards.encoder]['preset']}")
        return " ".join(a for a in args if a)
    entry = ENCODERS[wildcards.encoder]
    args.append(f"--preset {entry['preset']}")
    if entry["freeze"]:
        args.append("--freeze-backbone")
    if training["refit"]:
        args.append("--refit")
    args.append(f"--workers {training['workers']}")
    if training["epochs"] is not None:
        args.append(f"--epochs {training['epochs']}")
    if training["batch_size"] is not None:
        args.append(f"--batch-size {training['batch_size']}")
    args += [training["extra_args"]] if training["extra_args"] else []
    return " ".join(a for a in args if a)


def folds_args():
    folds = config["folds"]
    args = [
        f"--scheme {folds['scheme']}",
        f"--k {folds['k']}",
        f"--seed {folds['seed']}",
        f"--panel {folds['panel']}",
        f"--n-genes {folds['n_genes']}",
        f"--n-headline {folds['n_headline']}",
        f"--normalisation {folds['normalisation']}",
    ]
    if folds["gene_list"]:
        args.append(f"--gene-list {shlex.quote(folds['gene_list'])}")
    if folds["keep_mito_ribo"]:
        args.append("--keep-mito-ribo")
    if SCHEME == "fixed":
        args.append(f"--splits {shlex.quote(str(SPLITS_PATH))}")
    return " ".join(args)


def all_exports():
    """Every SpatialData store `export_all` makes (PSLIDES: predict_slide.smk)."""
    stores = [
        path.replace("{slide}", slide)
        for path in run_paths(f"{RESULTS}/export/{{run}}/{{fold}}/{{{{slide}}}}.zarr")
        for slide in FOLD_PLANS[path.split("/")[-2]].test
    ]
    stores += expand(f"{RESULTS}/export/slides/{{slide}}.zarr", slide=SLIDES)
    stores += expand(f"{RESULTS}/export/predict_slides/{{pslide}}.zarr", pslide=PSLIDES)
    return stores


# --- Job resources: what each job asks of the machine, or of SLURM -----------------------
# The rules say what their jobs need; profiles/slurm only names the site's partitions and
# account. GPUs (config resources.gpu) only for the jobs that run a network: training and
# prediction of the methods the registry marks `needs_gpu` (torch), embed_slide and
# predict_slide (they run the encoder); the ridge probes go to a CPU partition. CPUs: the
# job's `threads` (the SLURM plugin asks --cpus-per-task=threads). Minutes and MB per rule:
# the benchmark runs with headroom (docs/benchmarks.md, "Job resources"); each retry of a
# job (profiles/slurm: retries) asks for twice the memory and time of the attempt before.

#: (minutes, MB) per rule, train and predict per method kind; torch training takes the
#: config's resources.train_runtime and resources.train_mem_mb
JOB_SIZES = {
    "make_demo": (10, 2000),
    "ingest_slide": (30, 8000),
    "tile_slide": (60, 4000),
    "make_folds": (30, 8000),
    "embed_slide": (60, 8000),
    "train_ridge": (60, 8000),
    "predict_torch": (60, 8000),
    "predict_ridge": (30, 4000),
    "evaluate": (20, 4000),
    "report": (30, 4000),
    "predict_slide": (120, 4000),
    "export": (20, 4000),
}


def job_size(name, wildcards):
    """(minutes, MB) of one job of rule `name`; train and predict by the method's kind;
    `run_fold` (train, predict, evaluate one after the other, for each seed) their minutes'
    sum times the seeds and the largest memory of the three."""
    if name == "run_fold":  # per seed, one after the other
        sizes = [
            job_size(stage, wildcards) for stage in ("train", "predict", "evaluate")
        ]
        seeds = len(run_seeds(wildcards.method))
        return seeds * sum(minutes for minutes, _ in sizes), max(mb for _, mb in sizes)
    if name not in ("train", "predict"):
        return JOB_SIZES[name]
    kind = REGISTRY[wildcards.method].kind
    if (name, kind) == ("train", "torch"):
        return config["resources"]["train_runtime"], config["resources"]["train_mem_mb"]
    return JOB_SIZES[f"{name}_{kind}"]


def job_runtime(name):
    """The `runtime` resource (minutes) of rule `name`'s jobs, doubled on each retry."""
    return lambda wildcards, attempt: job_size(name, wildcards)[0] * 2 ** (attempt - 1)


def job_mem_mb(name):
    """The `mem_mb` resource of rule `name`'s jobs, doubled on each retry."""
    return lambda wildcards, attempt: job_size(name, wildcards)[1] * 2 ** (attempt - 1)


#: the priority of the rules that make a run's inputs (ingest, tiling, embeddings, folds):
#: above every run_fold job, so that no input of a long run waits behind shorter runs (on
#: her2st-effnet the `tail` embedding of one section, at priority 0, waited behind the
#: frozen-encoder runs, and every `stevs_tail` job with it)
INPUT_PRIORITY = 3


def run_priority(wildcards):
    """A run_fold job's place in the queue, longest first, so that a long job does not
    start last while the other cores idle (on her2st-effnet the last `stevs_tail` job
    started at minute 36 of 45): 2 for runs that train encoder weights (a trainable
    encoder, or `stevs_tail`'s last stage), 1 for the other torch methods, 0 for probes.
    """
    method = REGISTRY[wildcards.method]
    if method.kind != "torch":
        return 0
    entry = ENCODERS.get(wildcards.encoder) or {}
    trains_encoder = method.switches.get("train_tail_stages") or not entry.get("freeze")
    return 2 if trains_encoder else 1


def gpus(wildcards):
    """The `gpu` resource of a run_fold job: the configured count where the method
    runs a network (the registry's `needs_gpu`), 0 for the ridge probes."""
    return config["resources"]["gpu"] if REGISTRY[wildcards.method].needs_gpu else 0
