"""Device selection: the one place that turns ``--device`` into a torch device."""

from __future__ import annotations

import contextlib

import torch

from stevs.errors import StevsInputError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; a device this machine lacks, or a
    name torch does not know, is an error saying which devices there are."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise StevsInputError(
            None, f"--device {name} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not available.get(device.type, True):
        there = ", ".join(["cpu", *[k for k, v in available.items() if v]])
        raise StevsInputError(None, f"--device {name}: this machine has no {device.type} ({there})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise StevsInputError(None, f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: precisions a frozen encoder may embed in (``--precision``; ``auto``: the preset's on
#: CUDA, float32 elsewhere)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def resolve_precision(requested: str, device: torch.device, preset_precision: str) -> str:
    """The precision a frozen encoder embeds in: ``auto`` takes the preset's own
    (``Preset.embed_precision``) on CUDA and float32 elsewhere (CPU half-precision matmuls
    are slow on most CPUs); any other value is used as given, on any device."""
    if requested not in PRECISIONS:
        raise StevsInputError(None, f"--precision {requested}: use one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return preset_precision if device.type == "cuda" else "float32"
    return requested


def autocast_to(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (a resolved one: float32 is no autocast) on ``device``."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))
