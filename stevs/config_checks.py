"""The workflow's config checks: every problem of a config as one line, before any job runs.

workflow/rules/common.smk calls :func:`schema_problem` on the merged config (before the
schema's defaults are filled in) and :func:`settings_problem` after, and stops with the line;
the tests call them directly. Light on purpose: Snakemake imports this while it parses the
rules, in an environment that may hold only Snakemake and pandas (PyYAML, jsonschema).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from stevs.errors import StevsInputError
from stevs.methods import REGISTRY, check_he_only

#: a run of the workflow: (encoder id, method, seed)
Run = tuple[str, str, int]
#: a patch geometry: (pixels per side, µm per side)
Geometry = tuple[int, float]


def key_path(parts: Sequence[Any]) -> str:
    """('training', 'epochs') -> 'training.epochs'; list indices as [i]."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_problem(data: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """The config's first problem against the schema as one line, or None when it is valid
    (an unknown key names the allowed ones, and the close one: "did you mean")."""
    error = best_match(Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return None
    where = key_path(error.absolute_path)
    if "errorMessage" in error.schema:  # the schema's own wording of what the key takes
        return f"config: {where} is {error.instance!r}; it takes {error.schema['errorMessage']}"
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        key = next(key for key in error.instance if key not in allowed)
        close = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean '{key_path([*error.absolute_path, close[0]])}'?)" if close else ""
        return (
            f"config: unknown key '{key_path([*error.absolute_path, key])}'{hint};"
            f" allowed {'under ' + where if where else 'at the top level'}: {', '.join(allowed)}"
        )
    return f"config: {where or 'top level'}: {error.message}"


def in_schema_order(data: Any, schema: Mapping[str, Any]) -> Any:
    """A copy of the config with keys in the schema's order (not the order of the files)."""
    if not isinstance(data, dict):
        return data
    properties = schema.get("properties", {})
    keys = [k for k in properties if k in data] + [k for k in data if k not in properties]
    return {k: in_schema_order(data[k], properties.get(k, {})) for k in keys}


def encoder_id(entry: Mapping[str, Any]) -> str:
    """An encoder's id in paths: its preset, with ``-frozen`` when its backbone is frozen."""
    return entry["preset"] + ("-frozen" if entry["freeze"] else "")


def format_um(value: float) -> str:
    """128.0 -> '128', 112.5 -> '112.5' (µm in paths: no trailing zeros, 6 decimals at most)."""
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def geometry_id(geometry: Geometry) -> str:
    """(64, 128.0) -> '64px_128um': the folder of a geometry's patch caches and embeddings."""
    return f"{geometry[0]}px_{format_um(geometry[1])}um"


def tiling_geometry(config: Mapping[str, Any]) -> Geometry:
    """The `tiling:` section's geometry (its caches: ``{results}/patches/{slide}.h5``)."""
    tiling = config["tiling"]
    return int(tiling["patch_px"]), float(format_um(tiling["patch_um"]))


def encoder_geometry(entry: Mapping[str, Any], config: Mapping[str, Any]) -> Geometry:
    """The patch an encoder entry reads: its `patch_px` and `patch_um`, each a number,
    ``preset`` (the preset's own) or absent (the `tiling:` section's)."""
    from stevs.models.presets import PRESETS  # plain data, no torch

    preset = PRESETS[entry["preset"]]
    px, um = tiling_geometry(config)
    px = preset.patch_px if entry.get("patch_px") == "preset" else entry.get("patch_px", px)
    um = preset.patch_um if entry.get("patch_um") == "preset" else entry.get("patch_um", um)
    return int(px), float(format_um(um))


def encoder_runs(config: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], list[Run]]:
    """The encoders (id -> entry) and the runs of a checked config.

    An encoder's `methods` narrow the configured `methods` ([] = all). The registry says how
    a method runs: seeded methods once per training seed, the others once (seed 0); probes of
    a frozen encoder on each frozen encoder (:func:`runs_on`); methods that need no encoder
    once, under `none`.
    """
    methods = list(config["methods"])
    encoders, runs = {}, []
    for entry in config["encoders"]:
        name = encoder_id(entry)
        encoders[name] = entry
        for method in [m for m in methods if m in (entry["methods"] or methods)]:
            kind = REGISTRY[method]
            if runs_on(method, entry):
                seeds = config["training"]["seeds"] if kind.seeded else [0]
                runs += [(name, method, seed) for seed in seeds]
    runs += [("none", m, 0) for m in methods if REGISTRY[m].encoder == "none"]
    return encoders, runs


def runs_on(method: str, entry: Mapping[str, Any]) -> bool:
    """Whether a registry method runs on an encoder entry: probes and frozen-feature models
    only on a frozen encoder, a model that trains the encoder's last stage (embedding view
    ``tail``: ``stevs_tail``) only on a staged backbone (CNN, Swin), nothing encoder-free."""
    return _not_run_because(method, entry) is None


def _not_run_because(method: str, entry: Mapping[str, Any]) -> str | None:
    from stevs.models.presets import PRESETS  # plain data, no torch

    kind = REGISTRY[method]
    if kind.encoder == "none":
        return "needs no encoder"
    if kind.encoder == "frozen" and not entry["freeze"]:
        return f"probes a frozen encoder; set freeze: true or leave {method} out of its methods"
    pooling = PRESETS[entry["preset"]].backbone.pooling
    if kind.embedding_view == "tail" and pooling != "stages":
        return (
            f"trains the last stage of a staged encoder (CNN, Swin), and {entry['preset']} is"
            f" a ViT (pooling {pooling}); leave {method} out of its methods"
        )
    return None


def _encoders_problem(config: Mapping[str, Any]) -> str | None:
    seen: dict[str, Geometry] = {}
    for index, entry in enumerate(config["encoders"]):
        name, geometry = encoder_id(entry), encoder_geometry(entry, config)
        if name in seen and seen[name] != geometry:
            return (
                f"config: encoders[{index}]: {name} is listed twice, with patches"
                f" {geometry_id(seen[name])} and {geometry_id(geometry)}: both would write"
                f" {name}'s paths; keep one entry per preset and freeze"
            )
        if name in seen or name == "none":
            return (
                f"config: encoders[{index}]: {name} is listed twice (or is the reserved id 'none')"
            )
        seen[name] = geometry
        for method in entry["methods"]:  # listed by name: each must run on this encoder
            why = _not_run_because(method, entry)
            if why and REGISTRY[method].encoder != "none":
                return f"config: encoders[{index}]: {method} {why}"
    return None


def _predict_problem(config: Mapping[str, Any]) -> str | None:
    predict, methods = config["predict_slides"], list(config["methods"])
    if not predict["sheet"]:
        return None
    try:
        check_he_only(predict["model"])
    except StevsInputError as err:
        return f"config: predict_slides.model: {err}"
    if predict["model"] not in methods:
        return (
            f"config: predict_slides.model '{predict['model']}' is not one of the methods"
            f" ({', '.join(methods)}): add it to methods so its models are trained"
        )
    if not any(run[1] == predict["model"] for run in encoder_runs(config)[1]):
        return (
            f"config: predict_slides.model '{predict['model']}' runs on no encoder"
            " (see encoders[].methods)"
        )
    return None


def settings_problem(config: Mapping[str, Any]) -> str | None:
    """The first problem of a schema-valid config (defaults filled in) that the schema cannot
    see: files it names, the demo's sheet, encoders and the H&E-only model. None: none."""
    folds, demo = config["folds"], config["demo"]
    if folds["panel"] == "gene_list" and not folds["gene_list"]:
        return "config: folds.panel is gene_list, so folds.gene_list must name a file"
    if folds["gene_list"] and not Path(folds["gene_list"]).is_file():
        return f"config: folds.gene_list: {folds['gene_list']} is not a file"
    demo_sheet = Path(demo["out"]) / "samples.tsv"
    if demo["generate"] and Path(config["samples"]).resolve() != demo_sheet.resolve():
        return (
            f"config: demo.generate is true, so 'samples' must be the demo's sheet {demo_sheet},"
            f" not {config['samples']}; set demo.generate: false to run on your own sample sheet"
        )
    return _encoders_problem(config) or _predict_problem(config)
