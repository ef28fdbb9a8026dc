"""Hashing: ``file_sha256`` (provenance of models, folds, checkpoints) and ``tensors_sha256``
(the identity of weights a model folder records instead of storing them)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Hex SHA-256 of named tensors (torch or numpy): names, dtypes, shapes and bytes, in
    sorted name order, so equal weights give one hash whatever their order or device."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        array = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else value
        array = np.ascontiguousarray(array)
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
