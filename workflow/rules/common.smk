"""Helpers shared by the rules: config and sample-sheet validation, slide and fold lists."""

import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from stevs.errors import StevsInputError
from stevs.folds import plan_folds
from stevs.io.samples import read_sample_sheet

validate(config, schema="../schemas/config.schema.yaml")

DEMO = config["demo"]["generate"]
DEMO_SHEET = str(Path(config["demo"]["out"]) / "samples.tsv")
SCHEME = config["folds"]["scheme"]
RESULTS = config["results"].rstrip("/")
METHODS = list(config["methods"])
TORCH_METHODS = [m for m in METHODS if not m.startswith("ridge_")]


def _load_samples():
    """The sample sheet as a validated table; the demo's ids are known before it exists."""
    sheet = config["samples"]
    needs_patient = SCHEME in ("leave_one_patient_out", "group_kfold")
    if DEMO and not Path(sheet).is_file():
        if str(Path(sheet)) != str(Path(DEMO_SHEET)):
            raise WorkflowError(
                f"config: demo.generate is true, so 'samples' must be {DEMO_SHEET}, not {sheet}"
            )
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
    return list(table["slide_id"]), list(table["patient"])


SLIDES, PATIENTS = _load_samples()
try:
    FOLD_PLANS = {
        plan.name: plan
        for plan in plan_folds(
            SCHEME,
            SLIDES,
            PATIENTS,
            k=config["folds"]["k"],
            seed=config["folds"]["seed"],
        )
    }
except StevsInputError as err:
    raise WorkflowError(
        f"fold scheme '{SCHEME}' on {config['samples']}: {err}"
    ) from None
FOLDS = list(FOLD_PLANS)


wildcard_constraints:
    slide="|".join(map(re.escape, SLIDES)),
    fold="fold[0-9]+",
    method="|".join(map(re.escape, METHODS)),


def sample_sheet_input(wildcards):
    """The sample sheet (made by the demo rule when the demo is on)."""
    return DEMO_SHEET if DEMO else config["samples"]


def all_metrics():
    return expand(
        f"{RESULTS}/metrics/{{method}}/{{fold}}.tsv", method=METHODS, fold=FOLDS
    )


def training_args():
    """Command-line options of `stevs train` from the config."""
    training = config["training"]
    args = [
        f"--preset {training['preset']}",
        f"--seed {training['seed']}",
        f"--device {shlex.quote(training['device'])}",
        f"--workers {training['workers']}",
    ]
    if training["epochs"] is not None:
        args.append(f"--epochs {training['epochs']}")
    if training["batch_size"] is not None:
        args.append(f"--batch-size {training['batch_size']}")
    return " ".join(args + ([training["extra_args"]] if training["extra_args"] else []))


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
    return " ".join(args)
