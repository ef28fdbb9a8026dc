"""The workflow's config: the schema matches the package, bad configs stop before any job
runs with one line naming the problem, and the merged config reaches the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_snakemake

from stevs import metrics
from stevs.cli import main
from stevs.methods import METHOD_NAMES, REGISTRY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
BASE = ROOT / "config" / "config.yaml"


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_snakemake(*args, cwd=cwd)


def overlay(tmp_path: Path, text: str, name: str = "overlay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the schema and the package


def _enums(node, where=""):
    """Every (path, enum) of a JSON schema, depth first."""
    if isinstance(node, dict):
        if "enum" in node:
            yield where, node["enum"]
        for key, value in node.items():
            yield from _enums(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _enums(value, f"{where}[{index}]")


def test_schema_method_enums_are_the_registry():
    """Every enum of the schema that names a method lists exactly the registry's methods."""
    method_enums = {
        where: enum for where, enum in _enums(SCHEMA) if len(set(enum) & set(METHOD_NAMES)) > 1
    }
    assert len(method_enums) == 3, sorted(method_enums)  # methods, encoders[].methods, model
    for where, enum in method_enums.items():
        assert enum == list(METHOD_NAMES), where
    assert SCHEMA["properties"]["methods"]["default"] == ["stevs"]


def test_schema_slide_id_pattern_is_the_one_rule():
    from stevs.ids import SLIDE_ID_PATTERN

    samples = yaml.safe_load((ROOT / "workflow" / "schemas" / "samples.schema.yaml").read_text())
    assert samples["properties"]["slide_id"]["pattern"] == f"^{SLIDE_ID_PATTERN.pattern}$"
    rules = (ROOT / "workflow" / "rules" / "predict_slide.smk").read_text()
    assert "pslide=SLIDE_ID_PATTERN.pattern" in rules


def test_schema_view_enum_is_the_embedding_cache_views():
    from stevs.io.embedding_cache import VIEWS

    assert SCHEMA["properties"]["embeddings"]["properties"]["view"]["enum"] == list(VIEWS)


def test_schema_preset_enum_is_the_presets():
    from stevs.models.presets import PRESETS

    encoder = SCHEMA["properties"]["encoders"]["items"]["properties"]
    assert encoder["preset"]["enum"] == list(PRESETS)


def _objects(schema: dict, where: str = "config"):
    if schema.get("type") == "object":
        yield where, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _objects(sub, f"{where}.{key}")


def test_schema_rejects_unknown_keys_at_every_level():
    objects = dict(_objects(SCHEMA))
    assert {"config", "config.training", "config.demo", "config.predict_slides"} <= set(objects)
    assert {k for k, v in objects.items() if v.get("additionalProperties") is not False} == set()


def test_shipped_configs_pass_the_checks(tmp_path):
    """config.yaml alone and with the .test overlay plan without a config error."""
    for files in ([BASE], [BASE, ROOT / ".test" / "config" / "config.yaml"]):
        result = snakemake(
            "-n", "--configfile", *map(str, files), "--config", f"results={tmp_path}/r",
            cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "rule train" in result.stdout


def test_her2st_configs_pass_the_checks(her2st_dir, tmp_path):
    for extra in ([], [ROOT / "config" / "her2st_effnet.yaml"]):
        files = [BASE, ROOT / "config" / "her2st.yaml", *extra]
        result = snakemake(
            "-n", "--configfile", *map(str, files), "--config", f"data_root={her2st_dir}",
            cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------- bad configs stop before any job

DEMO_PREDICT = "predict_slides:\n  sheet: resources/demo/predict.tsv\n"


@pytest.mark.parametrize(
    ("text", "config_args", "message"),
    [
        (
            "trainng:\n  epochs: 2\n",
            [],
            "config: unknown key 'trainng' (did you mean 'training'?); allowed at the top level:",
        ),
        (
            "training:\n  epoch: 2\n",
            [],
            "config: unknown key 'training.epoch' (did you mean 'training.epochs'?)",
        ),
        ("tiling:\n  patch_pix: 64\n", [], "config: unknown key 'tiling.patch_pix'"),
        # --config KEY=VALUE sets top-level keys: a training option there is unknown
        ("{}\n", ["--config", "epochs=3"], "config: unknown key 'epochs'; allowed at the top"),
        ("methods: [stevs, ridge_colour]\n", [], "config: methods[1]: 'ridge_colour' is not one"),
        ("training:\n  epochs: 0\n", [], "config: training.epochs: 0 is less than the minimum"),
        (
            "encoders:\n  - preset: swin_s\n",
            [],
            "config: encoders[0].preset: 'swin_s' is not one of",
        ),
        (
            "encoders:\n  - preset: cpu_small\n    methods: [ridge_embed]\n",
            [],
            "config: encoders[0]: ridge_embed probes a frozen encoder; set freeze: true",
        ),
        ("training:\n  seeds: []\n", [], "config: training.seeds: [] should be non-empty"),
        (
            "samples: config/my_samples.tsv\n",
            [],
            "config: demo.generate is true, so 'samples' must be the demo's sheet "
            "resources/demo/samples.tsv, not config/my_samples.tsv; set demo.generate: false",
        ),
        (
            DEMO_PREDICT + "  model: ridge_color\n",
            [],
            "config: predict_slides.model: method 'ridge_color' cannot predict H&E-only slides",
        ),
        (
            DEMO_PREDICT + "  model: stevs_spatial_only\nmethods: [stevs, stevs_spatial_only]\n",
            [],
            "config: predict_slides.model: method 'stevs_spatial_only' cannot predict H&E-only",
        ),
        (
            DEMO_PREDICT + "  model: stnet\nmethods: [stevs, ridge_color]\n",
            [],
            "config: predict_slides.model 'stnet' is not one of the methods (stevs, ridge_color)",
        ),
        (
            "folds:\n  panel: gene_list\n",
            [],
            "config: folds.panel is gene_list, so folds.gene_list",
        ),
        ("folds:\n  gene_list: nope.txt\n", [], "config: folds.gene_list: nope.txt is not a file"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, text, config_args, message):
    result = snakemake(
        "-n", "--cores", "1", "--configfile", str(BASE), str(overlay(tmp_path, text)),
        *config_args, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    # one line, before the DAG is built and before anything is written
    assert len([line for line in output.splitlines() if line.startswith("config: ")]) == 1
    assert "Building DAG" not in output and "Job stats" not in output
    assert not (tmp_path / "results").exists()


def test_he_only_methods_are_accepted_for_predict_slides(tmp_path):
    """The rejection above is the registry's: every H&E-capable method passes."""
    from stevs.methods import check_he_only

    able = [name for name, method in REGISTRY.items() if method.he_only]
    assert "stevs" in able and "ridge_color" not in able
    assert all(check_he_only(name).name == name for name in able)  # the workflow's check
    for name in ("stnet",):  # one planned run beside the default (a dry run is ~12 s)
        text = f"{DEMO_PREDICT}  model: {name}\nmethods: [{name}]\n"
        result = snakemake(
            "-n", "--configfile", str(BASE), str(overlay(tmp_path, text)), cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"results/models/cpu_small/{name}/seed0/fold0/model.safetensors" in result.stdout


# ----------------------------------------------------------- the merged config and the report


def _fake_metrics(root: Path) -> Path:
    """One method, one fold of per-gene metrics: enough for `stevs report`."""
    genes = [f"g{i}" for i in range(4)]
    per_gene = pd.DataFrame(
        {
            "method": "stevs",
            "fold": "fold0",
            "slide": "demo_1",
            "gene": genes,
            "pearson_r": np.linspace(0.1, 0.4, 4),
            "spearman_rho": np.linspace(0.1, 0.4, 4),
            "mse": 1.0,
            "mae": 0.8,
            "coverage90": 0.9,
            "headline": True,
            "constant": False,
            "n_spots": 10,
        }
    )[metrics.PER_GENE_COLUMNS]
    out = root / "metrics" / "stevs" / "fold0.tsv"
    out.parent.mkdir(parents=True)
    pooled = pd.DataFrame({"method": "stevs", "fold": "fold0", "gene": genes, "pearson_r": 0.2})
    metrics.write_evaluation(per_gene, metrics.summarise_fold(per_gene), pooled, out)
    return root / "metrics"


def test_merged_config_reaches_the_report(tmp_path):
    """Two config files: {results}/config.yaml holds what Snakemake ran with (the second
    file's values, the first's and the schema's defaults) and the report shows that file."""
    second = overlay(
        tmp_path,
        "results: out/exp2\ntraining:\n  epochs: 7\n  seeds: [11, 12]\n"
        "  extra_args: \"--lr 3e-4 'it''s' $HOME `x`\"\nmethods: [stevs, stnet]\n",
        "second.yaml",
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(BASE.read_text())  # the directive's file
    configs = ("--configfile", str(BASE), str(second))
    plan = snakemake("-n", "-p", *configs, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    report_cmd = [line for line in plan.stdout.splitlines() if "stevs report" in line]
    assert report_cmd and "--config out/exp2/config.yaml" in report_cmd[0]

    written = snakemake("--cores", "1", *configs, "--", "out/exp2/config.yaml", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    merged_path = tmp_path / "out" / "exp2" / "config.yaml"
    merged = yaml.safe_load(merged_path.read_text())
    assert merged["training"]["epochs"] == 7 and merged["training"]["seeds"] == [11, 12]
    assert merged["methods"] == ["stevs", "stnet"]
    assert merged["training"]["extra_args"] == "--lr 3e-4 'it''s' $HOME `x`"  # written verbatim
    assert merged["folds"]["n_genes"] == 60  # the first file (config.yaml)
    assert merged["demo"]["generate"] is True
    assert [e["preset"] for e in merged["encoders"]] == ["cpu_small", "effnet_lite0_in1k"]
    assert merged["training"]["refit"] is True and merged["embeddings"]["view"] == "none"

    # unchanged config: nothing to do; a changed one rewrites the file (params trigger)
    again = snakemake("-n", *configs, "--", "out/exp2/config.yaml", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout
    # the same settings merged in another order (config/config.yaml read by the Snakefile's
    # configfile directive, after the --configfile files) give the same text: nothing to do
    alone = snakemake("-n", "--configfile", str(second), "--", "out/exp2/config.yaml", cwd=tmp_path)
    assert "Nothing to be done" in alone.stdout + alone.stderr, alone.stdout
    changed = snakemake(
        "-n", *configs, "--config", "data_root=x", "--", "out/exp2/config.yaml", cwd=tmp_path
    )
    assert "rule write_config" in changed.stdout, changed.stdout
    assert "Params have changed" in changed.stdout

    out = tmp_path / "report"
    argv = ["report", "--metrics", str(_fake_metrics(tmp_path)), "--config", str(merged_path)]
    assert main([*argv, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "epochs: 7" in page and "results: out/exp2" in page and "- stnet" in page
    assert "n_genes: 60" in page
    assert "training.seeds 11,12" in page and "folds.seed 0" in page
    assert "None" not in page.split("seeds (config)")[1].split("</p>")[0]
