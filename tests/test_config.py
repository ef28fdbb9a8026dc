"""The workflow's config: the schema matches the package, bad configs stop before any job
runs with one line naming the problem, and the merged config reaches the report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import Plan, run_snakemake
from snakemake.utils import update_config, validate

from stevs import metrics
from stevs.cli import main
from stevs.config_checks import in_schema_order, schema_problem, settings_problem
from stevs.methods import METHOD_NAMES, REGISTRY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCHEMA_PATH = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
DEMO = ROOT / "config" / "demo.yaml"
TEMPLATE = ROOT / "config" / "config.yaml"


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_snakemake(*args, cwd=cwd)


def config_of(*files: Path, **top: object) -> dict:
    """The config Snakemake builds from --configfile files (merged in order) and --config."""
    config: dict = {}
    for path in files:
        update_config(config, yaml.safe_load(Path(path).read_text()) or {})
    update_config(config, top)
    return config


def problem_of(config: dict) -> str | None:
    """What common.smk stops on (stevs.config_checks, the schema's defaults filled between),
    without a Snakemake run."""
    problem = schema_problem(config, SCHEMA)
    if problem:
        return problem
    validate(config, str(SCHEMA_PATH))
    return settings_problem(config)


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
    from stevs.io.embedding_cache import TEST_VIEWS

    assert SCHEMA["properties"]["embeddings"]["properties"]["view"]["enum"] == list(TEST_VIEWS)


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


def test_shipped_configs_pass_the_checks(demo_plan: Plan, tmp_path):
    """The demo (its plan) and the tiny .test config (alone) plan without a config error."""
    assert "rule run_fold:" in demo_plan.stdout
    test_config = ROOT / ".test" / "config" / "config.yaml"
    result = snakemake(
        "-n", "--configfile", str(test_config), "--config", f"results={tmp_path}/r", cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule run_fold:" in result.stdout and "rule predict_slide:" in result.stdout


def test_her2st_configs_pass_the_checks(her2st_dir, tmp_path):
    """Each her2st variant passes the config checks and its sheet reads; the effnet variant
    also plans (one dry run for the three)."""
    from stevs.io.samples import read_sample_sheet

    her2st = ROOT / "config" / "her2st.yaml"
    for extra in ([], ["her2st_effnet.yaml"], ["her2st_gpu.yaml"]):
        files = [her2st, *(ROOT / "config" / name for name in extra)]
        config = config_of(*files, data_root=str(her2st_dir))
        assert problem_of(config) is None, extra
        table = read_sample_sheet(ROOT / config["samples"], data_root=her2st_dir)
        assert len(table) >= 4 and set(table["format"]) == {"st"}
    files = [her2st, ROOT / "config" / "her2st_effnet.yaml"]
    result = snakemake(
        "-n", "--configfile", *map(str, files), "--config", f"data_root={her2st_dir}",
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _template_lines() -> list[tuple[list[str], str, str]]:
    """(key path, value text, comment) of every `key: value  # comment` line of the template."""
    lines, path, list_depth = [], [], None
    for line in TEMPLATE.read_text().splitlines():
        body, _, comment = line.partition("#")
        if not body.strip():
            continue
        depth = (len(body) - len(body.lstrip())) // 2
        if body.lstrip().startswith("-"):  # a list item: its lines are no schema keys
            list_depth = depth
            continue
        if list_depth is not None and depth > list_depth:
            continue
        list_depth = None
        key, _, value = body.strip().partition(":")
        path = [*path[:depth], key]
        lines.append((path, value.strip(), comment))
    return lines


def test_template_config_is_valid_and_its_defaults_are_the_schemas():
    """config/config.yaml (your own slides) passes the checks, names the sheet the README
    says, runs nothing of the demo, and every value it marks "(default)" is the schema's."""
    config = config_of(TEMPLATE)
    assert problem_of(config) is None
    assert config["samples"] == "config/samples.tsv" and config["demo"]["generate"] is False
    assert config["results"] != config_of(DEMO)["results"]
    assert [e["preset"] for e in config["encoders"]] == ["effnet_lite0_in1k"]
    marked = [(path, value) for path, value, comment in _template_lines() if "(default)" in comment]
    assert len(marked) > 25
    for path, value in marked:
        schema = SCHEMA
        for key in path:
            schema = schema["properties"][key]
        assert yaml.safe_load(value) == schema["default"], ".".join(path)


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
        (
            "encoders:\n  - preset: uni\n    freeze: true\n    methods: [stevs_tail]\n",
            [],
            "config: encoders[0]: stevs_tail trains the last stage of a staged encoder (CNN,"
            " Swin), and uni is a ViT (pooling cls); leave stevs_tail out of its methods",
        ),
        ("training:\n  seeds: []\n", [], "config: training.seeds: [] should be non-empty"),
        (
            "encoders:\n  - {preset: uni, patch_px: presets}\n",
            [],
            "config: encoders[0].patch_px is 'presets'; it takes a whole number of pixels"
            " 8-4096, or 'preset'",
        ),
        (
            "encoders:\n  - {preset: uni, patch_px: 4}\n",
            [],
            "config: encoders[0].patch_px is 4; it takes a whole number of pixels 8-4096",
        ),
        (
            "encoders:\n  - {preset: uni, patch_px: 224.5}\n",
            [],
            "config: encoders[0].patch_px is 224.5; it takes a whole number",
        ),
        (
            "encoders:\n  - {preset: uni, patch_um: 0}\n",
            [],
            "config: encoders[0].patch_um is 0; it takes a number of µm above 0, or 'preset'",
        ),
        (
            "encoders:\n  - {preset: uni, freeze: true}\n"
            "  - {preset: uni, freeze: true, patch_px: preset, patch_um: preset}\n",
            [],
            "config: encoders[1]: uni-frozen is listed twice, with patches 64px_128um and"
            " 224px_112um: both would write uni-frozen's paths",
        ),
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
def test_bad_config_is_one_line_naming_the_problem(tmp_path, text, config_args, message):
    """What the workflow stops on, checked as common.smk checks it (the wiring: below)."""
    top = dict(arg.split("=", 1) for arg in config_args[1:])  # --config KEY=VALUE
    problem = problem_of(config_of(DEMO, overlay(tmp_path, text), **top))
    assert problem is not None and message in problem, problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainng:\n  epochs: 2\n", "config: unknown key 'trainng' (did you mean 'training'?)"),
        (
            "encoders:\n  - {preset: uni, patch_um: big}\n",
            "config: encoders[0].patch_um is 'big'; it takes a number of µm above 0",
        ),
        (
            DEMO_PREDICT + "  model: stnet\nmethods: [stevs, ridge_color]\n",
            "config: predict_slides.model 'stnet' is not one of the methods (stevs, ridge_color)",
        ),
    ],
)
def test_bad_config_stops_snakemake_before_any_job(tmp_path, text, message):
    """A schema problem and a settings problem: Snakemake stops while parsing, with the one
    line, before the DAG is built and before anything is written."""
    result = snakemake(
        "-n", "--cores", "1", "--configfile", str(DEMO), str(overlay(tmp_path, text)),
        cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output
    assert len([line for line in output.splitlines() if line.startswith("config: ")]) == 1
    assert "Building DAG" not in output and "Job stats" not in output
    assert not (tmp_path / "results").exists()


def test_encoder_geometry_is_its_own_the_presets_or_the_tilings():
    """patch_px / patch_um: a number, 'preset' (the preset's), absent (tiling:'s); the id
    names the folder of its patch caches, µm without a trailing .0."""
    from stevs.config_checks import encoder_geometry, geometry_id, tiling_geometry

    config = config_of(DEMO)  # tiling: 64 px, 128 µm
    assert tiling_geometry(config) == (64, 128.0)
    cases = [
        ({}, "64px_128um"),
        ({"patch_px": "preset", "patch_um": "preset"}, "224px_112um"),
        ({"patch_px": "preset"}, "224px_128um"),
        ({"patch_px": 448, "patch_um": 112.5}, "448px_112.5um"),
        ({"patch_px": 224.0, "patch_um": 224.0}, "224px_224um"),
    ]
    for entry, expected in cases:
        geometry = encoder_geometry({"preset": "uni", **entry}, config)
        assert geometry_id(geometry) == expected, entry
    config["encoders"] = [
        {"preset": "uni", "freeze": True, "patch_px": "preset", "patch_um": "preset"},
        {"preset": "swin_t", "patch_px": 224, "patch_um": 112},
        {"preset": "cpu_small"},
    ]
    assert problem_of(config) is None


def test_he_only_methods_are_accepted_for_predict_slides(tmp_path):
    """The rejection above is the registry's: every H&E-capable method passes the workflow's
    checks as the model of H&E-only slides (with the demo's encoders)."""
    able = [name for name, method in REGISTRY.items() if method.he_only]
    assert "stevs" in able and "stnet" in able and "ridge_color" not in able
    frozen = "encoders: [{preset: effnet_lite0_in1k, freeze: true, methods: []}]\n"
    for name in able:
        text = f"{DEMO_PREDICT}  model: {name}\nmethods: [{name}]\n"
        if REGISTRY[name].encoder == "frozen":  # the demo's frozen encoder lists its methods
            text += frozen
        assert problem_of(config_of(DEMO, overlay(tmp_path, text))) is None, name


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
    file's values, the first's and the schema's defaults, nothing of config/config.yaml) and
    the report shows that file; without --configfile, config/config.yaml is the config."""
    second = overlay(
        tmp_path,
        "results: out/exp2\ntraining:\n  epochs: 7\n  seeds: [11, 12]\n"
        "  extra_args: \"--lr 3e-4 'it''s' $HOME `x`\"\nmethods: [stevs, stnet]\n",
        "second.yaml",
    )
    # the Snakefile's configfile directive reads config/config.yaml only without --configfile
    directive = yaml.safe_load(DEMO.read_text())
    directive["results"], directive["folds"]["n_genes"] = "out/default", 77
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(directive))
    configs = ("--configfile", str(DEMO), str(second))
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
    assert merged["folds"]["n_genes"] == 60  # the first file (demo.yaml), not the directive's
    assert merged["demo"]["generate"] is True
    assert [e["preset"] for e in merged["encoders"]] == ["cpu_small", "effnet_lite0_in1k"]
    assert merged["training"]["refit"] is True and merged["embeddings"]["view"] == "none"

    # unchanged config: nothing to do; a changed one rewrites the file (params trigger)
    again = snakemake("-n", *configs, "--", "out/exp2/config.yaml", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout
    changed = snakemake(
        "-n", *configs, "--config", "data_root=x", "--", "out/exp2/config.yaml", cwd=tmp_path
    )
    assert "rule write_config" in changed.stdout, changed.stdout
    assert "Params have changed" in changed.stdout
    # no --configfile: the directive's file
    default = snakemake("--cores", "1", "--", "out/default/config.yaml", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert yaml.safe_load((tmp_path / "out/default/config.yaml").read_text())["folds"] == {
        **merged["folds"], "n_genes": 77
    }  # fmt: skip
    # the same settings in another key order give the same text (write_config's parameter)
    shuffled = dict(reversed(list(merged.items())))
    assert in_schema_order(shuffled, SCHEMA) == in_schema_order(merged, SCHEMA)
    assert list(in_schema_order(shuffled, SCHEMA)) == list(merged)

    out = tmp_path / "report"
    argv = ["report", "--metrics", str(_fake_metrics(tmp_path)), "--config", str(merged_path)]
    assert main([*argv, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "epochs: 7" in page and "results: out/exp2" in page and "- stnet" in page
    assert "n_genes: 60" in page
    assert "training.seeds 11,12" in page and "folds.seed 0" in page
    assert "None" not in page.split("seeds (config)")[1].split("</p>")[0]


def _own_slides_commands() -> list[str]:
    """The command lines of README's "Running on your own slides" first code block."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on your own slides\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_own_slides_section_works_as_written(tmp_path):
    """README's own-slides commands, run in a copy of the checkout's config/ (a sheet from
    the Visium template pointing at stand-in files): the venv to activate, the template to
    copy and the config that plans."""
    commands = _own_slides_commands()
    assert commands == [
        "make install",
        "source .venv/bin/activate",
        "cp config/samples_visium.tsv config/samples.tsv",
        "snakemake -n --cores 8",
        "snakemake --cores 8",
    ], commands
    makefile = (ROOT / "Makefile").read_text()
    assert "\ninstall: $(STAMP)" in makefile and "VENV ?= .venv" in makefile  # what it activates
    for line in (ROOT / "README.md").read_text().splitlines():  # the other template it names
        assert "config/samples_st.tsv" not in line or (ROOT / "config/samples_st.tsv").is_file()
    shutil.copytree(ROOT / "config", tmp_path / "config")
    subprocess.run(commands[2].split(), cwd=tmp_path, check=True)
    # the user's edit: the template's columns, rows pointing at files that exist
    sheet = tmp_path / "config" / "samples.tsv"
    header = next(x for x in sheet.read_text().splitlines() if not x.startswith("#"))
    rows = []
    for slide, patient in (("S1", "P1"), ("S2", "P1"), ("S3", "P2")):
        (tmp_path / "data" / slide / "outs").mkdir(parents=True)
        (tmp_path / "data" / slide / "image.tif").write_bytes(b"x")
        rows.append(
            f"{slide}\t{patient}\t../data/{slide}/image.tif\t../data/{slide}/outs\tvisium\t\t"
        )
    sheet.write_text("\n".join([header, *rows]) + "\n")
    result = snakemake(*commands[3].split()[1:], cwd=tmp_path)  # config/config.yaml
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rule embed_slide:" in result.stdout and "rule report:" in result.stdout
    assert "results/my_slides/models/effnet_lite0_in1k-frozen/stevs/seed2/fold0" in result.stdout
    assert "results/my_slides/slides/S3.h5ad" in result.stdout


def test_sample_sheet_templates_read_as_their_format():
    from stevs.io.samples import read_sample_sheet

    for name, fmt in (("samples_visium.tsv", "visium"), ("samples_st.tsv", "st")):
        path = ROOT / "config" / name
        table = read_sample_sheet(path, check_paths=False, require_patient=True)
        assert len(table) >= 3 and set(table["format"]) == {fmt}, name
        assert table["patient"].nunique() >= 2  # leave_one_patient_out, config.yaml's scheme
        comments = [x for x in path.read_text().splitlines() if x.startswith("#")]
        for column in ("slide_id", "patient", "image", "expression", "format", "spots", "mpp"):
            assert any(x.startswith(f"#   {column} ") for x in comments), (name, column)
        assert all(table["spots"].astype(bool)) == (fmt == "st")


def test_stevs_tail_runs_only_on_a_frozen_cnn_encoder():
    """Listed for every encoder (methods: []), stevs_tail runs on the frozen CNN and is
    left out for a ViT and for a trainable encoder, as the probes are; listed by name on a
    ViT it is a one-line error (above)."""
    from stevs.config_checks import encoder_runs

    config = config_of(DEMO)
    config["methods"] = ["stevs", "stevs_tail", "ridge_embed"]
    config["encoders"] = [
        {"preset": "effnet_lite0_in1k", "freeze": True, "methods": []},
        {"preset": "uni", "freeze": True, "methods": []},
        {"preset": "cpu_small", "freeze": False, "methods": []},
    ]
    _, runs = encoder_runs(config)
    tail = sorted({e for e, m, _ in runs if m == "stevs_tail"})
    assert tail == ["effnet_lite0_in1k-frozen"]
    assert {e for e, m, _ in runs if m == "stevs"} == {
        "effnet_lite0_in1k-frozen", "uni-frozen", "cpu_small"
    }  # fmt: skip
    assert problem_of(config) is None
