"""The HDF5 embedding cache (``results/embeddings/{encoder}/{view}/{slide}.h5``): its one
reader and one writer.

A frozen image encoder's features of every spot of one slide, computed once (``stevs
embed``) and read by every method that probes or trains on that frozen encoder
(``ridge_embed``, ``stevs train --freeze-backbone``, ``stevs predict`` of such a model).

Layout: datasets ``embeddings`` float32 (N, D) and ``barcodes`` (N,) utf-8 in the order of
the slide's patch cache; attributes ``slide``, ``preset`` (the ``stevs.models`` preset),
``backbone`` (timm name), ``weights`` (the backbone's weight source), ``view`` (``none``, or
``dihedral8``: the mean embedding over the 8 flips and quarter turns of each patch;
``tail``: the pooled stages but the last, then the last stage's input maps, flattened),
``patch_px``, ``mpp_target`` (the patch cache's scale), ``source_patches`` and
``stevs_version``. Written atomically (a temporary sibling renamed when complete).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stevs import __version__
from stevs.atomic import atomic_path, is_hdf5_with
from stevs.errors import StevsInputError
from stevs.io.patch_cache import PatchScale, hdf5_attr_value

EMBEDDINGS = "embeddings"
BARCODES = "barcodes"
#: test-time views of a patch an embedding can average over (the config's embeddings.view)
TEST_VIEWS = ("none", "dihedral8")
#: every layout of a cache: the test-time views, and ``tail`` (what stevs_tail reads)
VIEWS = (*TEST_VIEWS, "tail")


@dataclass(frozen=True)
class EmbeddingKey:
    """What decides an embedding: the encoder, its weights, the patch scale and the view."""

    preset: str
    backbone: str
    weights: str
    view: str
    patch_px: int
    mpp_target: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: EmbeddingKey) -> list[str]:
        """``field: ours vs theirs`` for every field that differs (scale within 1e-6)."""
        problems = []
        for name, mine in self.to_dict().items():
            theirs = getattr(other, name)
            same = (
                PatchScale(self.patch_px, self.mpp_target).matches(
                    PatchScale(other.patch_px, other.mpp_target)
                )
                if name in ("patch_px", "mpp_target")
                else mine == theirs
            )
            if not same:
                problems.append(f"{name} {theirs!r}, expected {mine!r}")
        return problems


class EmbeddingCache:
    """Read side of an embedding cache; validates on open (errors name the file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StevsInputError(self.path, "embedding cache not found (run 'stevs embed')")
        try:
            with h5py.File(self.path, "r") as handle:
                for key in (EMBEDDINGS, BARCODES):
                    if key not in handle:
                        raise StevsInputError(self.path, f"not an embedding cache: no '{key}'")
                self.embeddings = np.asarray(handle[EMBEDDINGS][()], dtype=np.float32)
                self.barcodes = [str(b) for b in handle[BARCODES].asstr()[()]]
                attrs = {k: hdf5_attr_value(v) for k, v in handle.attrs.items()}
        except OSError as err:
            raise StevsInputError(self.path, f"not a readable HDF5 file: {err}") from err
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.barcodes):
            raise StevsInputError(
                self.path,
                f"embeddings {self.embeddings.shape} do not match {len(self.barcodes)} barcodes",
            )
        if not np.isfinite(self.embeddings).all():
            raise StevsInputError(self.path, "embeddings hold NaN or infinite values")
        try:
            self.key = EmbeddingKey(
                preset=str(attrs["preset"]),
                backbone=str(attrs["backbone"]),
                weights=str(attrs["weights"]),
                view=str(attrs["view"]),
                patch_px=int(attrs["patch_px"]),
                mpp_target=float(attrs["mpp_target"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise StevsInputError(self.path, f"embedding cache attribute missing: {err}") from err
        self.slide = str(attrs.get("slide", ""))
        self.attrs = attrs
        self._row = {b: i for i, b in enumerate(self.barcodes)}

    @property
    def feature_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.barcodes)

    def check(self, expected: EmbeddingKey) -> EmbeddingCache:
        """This cache, or an error naming every way it differs from ``expected``."""
        problems = expected.mismatch(self.key)
        if problems:
            raise StevsInputError(
                self.path,
                "embeddings of another encoder or patch scale: " + "; ".join(problems),
            )
        return self

    def read(self, barcodes: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings (N, D) of ``barcodes`` in their order (all spots when None)."""
        if barcodes is None:
            return self.embeddings.copy()
        missing = [b for b in barcodes if b not in self._row]
        if missing:
            raise StevsInputError(
                self.path, f"{len(missing)} spots have no embedding, e.g. {missing[0]}"
            )
        return self.embeddings[[self._row[b] for b in barcodes]]


def write_embedding_cache(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    barcodes: Sequence[str],
    key: EmbeddingKey,
    *,
    slide: str = "",
    source_patches: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an embedding cache atomically; NaN or infinite values are refused."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(barcodes):
        raise ValueError(f"embeddings {embeddings.shape} for {len(barcodes)} barcodes")
    if not np.isfinite(embeddings).all():
        raise StevsInputError(path, "refusing to write NaN or infinite embeddings")
    if key.view not in VIEWS:
        raise ValueError(f"unknown view {key.view!r}; use one of {VIEWS}")
    ours = lambda p: is_hdf5_with(p, EMBEDDINGS, "backbone")  # noqa: E731
    with atomic_path(path, suffix=".h5", replaces=ours) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset(EMBEDDINGS, data=embeddings)
        handle.create_dataset(
            BARCODES, data=np.array(list(barcodes), dtype=object), dtype=h5py.string_dtype()
        )
        attrs = {
            **key.to_dict(),
            "slide": slide,
            "source_patches": source_patches,
            "stevs_version": __version__,
            **dict(extra or {}),
        }
        for name, value in attrs.items():
            handle.attrs[name] = value
    return Path(path)


def embedding_path(folder: str | os.PathLike, slide: str) -> Path:
    """The cache of ``slide`` in a folder of embedding caches."""
    return Path(folder) / f"{slide}.h5"
