"""Helpers shared by the rules: config and sample-sheet validation, slide and fold lists."""

import difflib
import re
import shlex
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from stevs.errors import StevsInputError
from stevs.folds import plan_folds
from stevs.io.embedding_cache import VIEWS
from stevs.io.samples import hest_metadata_path, read_fixed_splits, read_sample_sheet
from stevs.methods import REGISTRY, check_he_only, names

CONFIG_SCHEMA = "../schemas/config.schema.yaml"


def _key_path(parts):
    """('training', 'epochs') -> 'training.epochs'; list indices as [i]."""
    text = ""
    for part in parts:
        text += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{part}" if text else str(part))
        )
    return text


def config_problem(data, schema):
    """The config's first problem against the schema as one line, or None when it is valid."""
    error = best_match(Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return None
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in allowed]
        key = unknown[0]
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = (
            f" (did you mean '{_key_path([*error.absolute_path, close[0]])}'?)"
            if close
            else ""
        )
        return (
            f"config: unknown key '{_key_path([*error.absolute_path, key])}'{hint};"
            f" allowed {'under ' + where if where else 'at the top level'}:"
            f" {', '.join(allowed)}"
        )
    return f"config: {where or 'top level'}: {error.message}"


with open(workflow.source_path(CONFIG_SCHEMA)) as _schema_file:
    _schema = yaml.safe_load(_schema_file)
_problem = config_problem(config, _schema)
if _problem:
    raise WorkflowError(_problem)
validate(config, schema=CONFIG_SCHEMA)  # fills in the schema's defaults


def in_schema_order(data, schema):
    """A copy of the config with keys in the schema's order (not the order of the files)."""
    if not isinstance(data, dict):
        return data
    properties = schema.get("properties", {})
    keys = [k for k in properties if k in data] + [
        k for k in data if k not in properties
    ]
    return {k: in_schema_order(data[k], properties.get(k, {})) for k in keys}


# What this run really uses: every --configfile merged, --config overrides, the defaults.
# The write_config rule stores it as {results}/config.yaml (for the report's provenance);
# in the schema's key order, so the same settings always give the same text.
CONFIG_YAML = yaml.safe_dump(
    in_schema_order(config, _schema), sort_keys=False, default_flow_style=False
)

_gene_list = config["folds"]["gene_list"]
if config["folds"]["panel"] == "gene_list" and not _gene_list:
    raise WorkflowError(
        "config: folds.panel is gene_list, so folds.gene_list must name a file"
    )
if _gene_list and not Path(_gene_list).is_file():
    raise WorkflowError(f"config: folds.gene_list: {_gene_list} is not a file")

DEMO = config["demo"]["generate"]
DEMO_SHEET = str(Path(config["demo"]["out"]) / "samples.tsv")
SCHEME = config["folds"]["scheme"]
RESULTS = config["results"].rstrip("/")
METHODS = list(config["methods"])
TORCH_METHODS = [m for m in METHODS if m in names("torch")]
RIDGE_METHODS = [m for m in METHODS if m in names("ridge")]


def _load_samples():
    """Slide ids and patients: from the validated sample sheet, or the demo's (known from
    the config, before and after make_demo writes its sheet: demo_1..n, patients P1/P2).
    """
    sheet = config["samples"]
    needs_patient = SCHEME in ("leave_one_patient_out", "group_kfold")
    if DEMO and Path(sheet).resolve() != Path(DEMO_SHEET).resolve():
        raise WorkflowError(
            f"config: demo.generate is true, so 'samples' must be the demo's sheet {DEMO_SHEET},"
            f" not {sheet}; set demo.generate: false to run on your own sample sheet"
        )
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


def _encoder_runs():
    """The encoders (id -> entry) and the runs: (encoder id, method, seed) triples.

    An encoder's id is its preset, with `-frozen` when its backbone is frozen (paths carry
    it); its `methods` narrow the configured `methods` ([] = all). The method registry
    says how a method runs: seeded methods (torch) once per training seed, the others once
    (seed 0); probes of a frozen encoder (ridge_embed) on each frozen encoder; methods that
    need no encoder (ridge_color) once, under the id `none`.
    """
    encoders, runs = {}, []
    for index, entry in enumerate(config["encoders"]):
        name = entry["preset"] + ("-frozen" if entry["freeze"] else "")
        if name in encoders or name == "none":
            raise WorkflowError(
                f"config: encoders[{index}]: {name} is listed twice (or is the reserved"
                " id 'none')"
            )
        probes = [m for m in entry["methods"] if REGISTRY[m].encoder == "frozen"]
        if probes and not entry["freeze"]:
            raise WorkflowError(
                f"config: encoders[{index}]: {probes[0]} probes a frozen encoder; set"
                f" freeze: true or leave {probes[0]} out of its methods"
            )
        encoders[name] = entry
        # an encoder's methods narrow `methods` (one not in `methods` does not run)
        for method in [m for m in METHODS if m in (entry["methods"] or METHODS)]:
            kind = REGISTRY[method]
            if kind.encoder == "any":
                seeds = config["training"]["seeds"] if kind.seeded else [0]
                runs += [(name, method, seed) for seed in seeds]
            elif kind.encoder == "frozen" and entry["freeze"]:
                runs.append((name, method, 0))
    runs += [("none", m, 0) for m in METHODS if REGISTRY[m].encoder == "none"]
    return encoders, runs


ENCODERS, RUNS = _encoder_runs()
VIEW = config["embeddings"]["view"]


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDES)),
    fold="fold[0-9]+",
    method="|".join(map(re.escape, METHODS)),
    encoder="|".join(map(re.escape, [*ENCODERS, "none"])),
    seed="[0-9]+",
    view="|".join(map(re.escape, VIEWS)),


#: run path components: {encoder}/{method}/seed{seed}
RUN = "{encoder}/{method}/seed{seed}"


def run_paths(pattern, runs=None):
    """`pattern` (with {run} and {fold}) for every run and fold."""
    return [
        pattern.format(run=f"{e}/{m}/seed{s}", fold=fold)
        for e, m, s in (RUNS if runs is None else runs)
        for fold in FOLDS
    ]


def all_metrics():
    return run_paths(f"{RESULTS}/metrics/{{run}}/{{fold}}.tsv")


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


def embedding_dir(encoder):
    return f"{RESULTS}/embeddings/{ENCODERS[encoder]['preset']}/{VIEW}"


def fold_slides(fold, split):
    """Slides of a fold that a stage reads: `fit` (train + val, for training) or `test`."""
    plan = FOLD_PLANS[fold]
    slides = [*plan.train, *plan.val] if split == "fit" else list(plan.test)
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
        if patches:
            files["patches"] = expand(f"{RESULTS}/patches/{{slide}}.h5", slide=slides)
        if patches and "encoder" in wildcards.keys() and uses_embeddings(wildcards):
            folder = embedding_dir(wildcards.encoder)
            files["embeddings"] = expand(f"{folder}/{{slide}}.h5", slide=slides)
        return files

    return inputs


def embedding_args(wildcards):
    """`--embeddings DIR --embedding-view V` of a run that reads the embedding cache."""
    if not uses_embeddings(wildcards):
        return ""
    return f"--embeddings {embedding_dir(wildcards.encoder)} --embedding-view {VIEW}"


def training_args(wildcards):
    """Command-line options of `stevs train` for one run, from the config.

    Torch methods get every training option, the encoder's preset and its freeze flag;
    ridge methods only those they use (seed, device, and for a probe of a frozen encoder
    the encoder), so a new `training.epochs` does not refit the ridge baselines.
    """
    training = config["training"]
    method = wildcards.method
    args = [
        f"--seed {wildcards.seed}",
        f"--device {shlex.quote(training['device'])}",
        embedding_args(wildcards),
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
    """(minutes, MB) of one job of rule `name`; train and predict by the method's kind."""
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


def gpus(wildcards):
    """The `gpu` resource of a train or predict job: the configured count where the method
    runs a network (the registry's `needs_gpu`), 0 for the ridge probes."""
    return config["resources"]["gpu"] if REGISTRY[wildcards.method].needs_gpu else 0
