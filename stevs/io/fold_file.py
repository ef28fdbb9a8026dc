"""The fold file (``results/folds/{fold}.json``): its one reader and one writer.

Every stage that needs a fold (training, prediction, evaluation, the baselines, the report,
H&E-only prediction) reads it through :func:`read_fold`, which validates the whole file and
names it in every error; :func:`write_fold` writes it atomically. The layout is described in
docs/architecture.md ("Fold file").
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

from stevs import __version__
from stevs.atomic import atomic_write_text, is_json_with
from stevs.errors import StevsInputError

SCHEMES = (
    "leave_one_slide_out",
    "leave_one_patient_out",
    "group_kfold",
    "within_slice",
    "fixed",
)
SPLITS = ("train", "val", "test")
#: how a fold's targets are normalised (:func:`stevs.panels.normalise`), and the library size
#: of ``log1p_cp10k``; here, with the format that records them, so that fold planning (and the
#: workflow, at parse time) needs neither scipy nor the panels
NORMALISATIONS = ("log1p_cp10k", "log1p", "raw")
TARGET_SUM = 10_000.0


@dataclass
class SlideEntry:
    """One slide of a fold: its id, patient and the files the fold reads."""

    slide: str
    patient: str
    adata: str
    patches: str


@dataclass
class Fold:
    """The contents of a fold file (``results/folds/{fold}.json``)."""

    fold: str
    scheme: str
    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    genes: list[str]
    headline_genes: list[str]
    panel: dict[str, Any]
    normalisation: dict[str, Any]
    slides: list[SlideEntry]
    spots: dict[str, dict[str, list[str]]] | None = None
    validation: str = "slide"
    shared_patients: list[str] = field(default_factory=list)
    n_spots: dict[str, int] = field(default_factory=dict)
    stevs_version: str = __version__
    path: str | None = field(default=None, compare=False)

    @property
    def slide_ids(self) -> list[str]:
        """All slide ids of the fold; ``SpotDataset`` items index into this list."""
        return [entry.slide for entry in self.slides]

    def slide_index(self, slide: str) -> int:
        """Position of ``slide`` in :attr:`slide_ids`."""
        return self.slide_ids.index(slide)

    def slide_entry(self, slide: str) -> SlideEntry:
        """The :class:`SlideEntry` of ``slide``; an error naming the fold file if unknown."""
        if slide not in self.slide_ids:
            raise StevsInputError(self.path, f"slide {slide!r} is not a slide of this fold")
        return self.slides[self.slide_index(slide)]

    def split_slides(self, split: str) -> list[str]:
        """Slide ids of a split (``train``, ``val`` or ``test``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        return list(getattr(self, split))

    def spots_for(self, split: str, slide: str) -> list[str] | None:
        """Barcodes of ``slide`` in ``split``, or None when the split takes the whole slide."""
        if self.spots is None or split not in self.spots:
            return None
        return self.spots[split].get(slide)

    @property
    def normalisation_method(self) -> str:
        """``log1p_cp10k`` or ``raw``."""
        return str(self.normalisation["method"])

    @property
    def target_sum(self) -> float:
        """Counts per spot of the ``log1p_cp10k`` scaling."""
        return float(self.normalisation.get("target_sum") or TARGET_SUM)

    def slides_of(self, *splits: str) -> list[str]:
        """Slide ids of some splits, each once, in fold order (all splits when none given)."""
        chosen = set().union(*(self.split_slides(s) for s in splits or SPLITS))
        return [s for s in self.slide_ids if s in chosen]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the fold file."""
        data = asdict(self)
        data.pop("path")
        if data["spots"] is None:
            data.pop("spots")
        return data


def patches_path(folder: str | PathLike, slide: str) -> str:
    """A slide's patch cache in a folder of them (``stevs tile``'s ``{folder}/{slide}.h5``)."""
    return os.fspath(Path(folder) / f"{slide}.h5")


def with_patches_dir(fold: Fold, folder: str | PathLike) -> Fold:
    """``fold`` reading every slide's patch cache from ``folder`` instead of the fold file's
    (another patch geometry's caches: the workflow's ``{results}/patches/{px}px_{um}um/``)."""
    slides = [replace(entry, patches=patches_path(folder, entry.slide)) for entry in fold.slides]
    return replace(fold, slides=slides)


def fold_argument(fold: str | PathLike, patches_dir: str | PathLike | None) -> Fold | str:
    """What a stage takes for ``--fold`` and ``--patches-dir``: the fold file, or with a
    patches folder the fold read from it with its caches there."""
    if patches_dir is None:
        return os.fspath(fold)
    return with_patches_dir(read_fold(fold), patches_dir)


def add_patches_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--patches-dir`` of ``stevs train`` and ``stevs predict``."""
    parser.add_argument(
        "--patches-dir",
        help="folder of the slides' {slide}.h5 patch caches, read instead of the fold file's "
        "(e.g. another patch geometry's; default: the fold file's)",
    )


#: keys every fold file holds: a file at a fold's path is replaced only when it has them
FOLD_KEYS = ("fold", "scheme", "genes", "slides", "normalisation")


def is_fold_file(path: str | PathLike) -> bool:
    """True for a JSON object with the keys of a fold file (an earlier one, replaceable)."""
    return is_json_with(path, *FOLD_KEYS)


def write_fold(fold: Fold, path: str | PathLike) -> Path:
    """Write a fold file atomically; a file already there is replaced only if it is a fold
    file, anything else is an error naming it."""
    path = Path(path)
    atomic_write_text(path, json.dumps(fold.to_dict(), indent=1) + "\n", replaces=is_fold_file)
    return path


def _require(path: Path, ok: bool, problem: str) -> None:
    if not ok:
        raise StevsInputError(path, problem)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_fold(path: str | PathLike) -> Fold:
    """Read and validate a fold file; problems raise :class:`StevsInputError` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise StevsInputError(path, f"cannot read the fold file: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise StevsInputError(path, f"not a valid fold file (bad JSON: {err})") from err
    _require(path, isinstance(data, dict), "a fold file holds a JSON object")
    required = (
        "fold scheme seed train val test genes headline_genes panel normalisation slides"
    ).split()
    missing = [key for key in required if key not in data]
    _require(path, not missing, f"fold file lacks {', '.join(missing)}")
    _require(path, data["scheme"] in SCHEMES, f"unknown scheme {data['scheme']!r}")
    _require(path, isinstance(data["seed"], int), "seed must be an integer")
    for key in ("train", "val", "test", "genes", "headline_genes"):
        _require(path, _is_str_list(data[key]), f"{key} must be a list of strings")
    genes = data["genes"]
    _require(path, len(genes) > 0, "the gene panel is empty")
    _require(path, len(set(genes)) == len(genes), "the gene panel repeats genes")
    _require(path, set(data["headline_genes"]) <= set(genes), "headline genes must be panel genes")
    try:
        slides = [SlideEntry(**entry) for entry in data["slides"]]
    except TypeError as err:
        raise StevsInputError(
            path, f"slides must be a list of {{slide, patient, adata, patches}}: {err}"
        ) from err
    slide_ids = [entry.slide for entry in slides]
    _require(path, len(set(slide_ids)) == len(slide_ids), "slides repeat a slide id")
    for split in SPLITS:
        unknown = set(data[split]) - set(slide_ids)
        _require(path, not unknown, f"{split} names slides not in slides: {sorted(unknown)}")
    _require(path, bool(data["train"]) and bool(data["test"]), "train and test must not be empty")
    norm = data["normalisation"]
    _require(
        path,
        isinstance(norm, dict) and norm.get("method") in NORMALISATIONS,
        f"normalisation.method must be one of {NORMALISATIONS}",
    )
    for key in ("mean", "std"):
        values = norm.get(key)
        _require(
            path,
            isinstance(values, list) and len(values) == len(genes),
            f"normalisation.{key} needs one number per panel gene ({len(genes)})",
        )
    spots = data.get("spots")
    if spots is not None:
        _require(path, isinstance(spots, dict), "spots must map split -> slide -> barcodes")
        for split, by_slide in spots.items():
            _require(path, split in SPLITS, f"spots has an unknown split {split!r}")
            _require(path, isinstance(by_slide, dict), f"spots.{split} must map slide -> list")
            for slide, barcodes in by_slide.items():
                _require(path, slide in data[split], f"spots.{split} names slide {slide}")
                _require(path, _is_str_list(barcodes), f"spots.{split}.{slide} not a list")
    fold = Fold(
        fold=str(data["fold"]),
        scheme=data["scheme"],
        seed=data["seed"],
        train=data["train"],
        val=data["val"],
        test=data["test"],
        genes=genes,
        headline_genes=data["headline_genes"],
        panel=data["panel"],
        normalisation=norm,
        slides=slides,
        spots=spots,
        validation=data.get("validation", "slide"),
        shared_patients=data.get("shared_patients", []),
        n_spots=data.get("n_spots", {}),
        stevs_version=data.get("stevs_version", ""),
        path=str(path),
    )
    check_no_overlap(fold, path)
    return fold


def check_no_overlap(fold: Fold, path: Path | None) -> None:
    """Held-out data never meets training data: per slide, or per spot where spots split."""
    pairs = (("val", "test"), ("train", "test"), ("train", "val"))
    for a, b in pairs:
        for slide in set(getattr(fold, a)) & set(getattr(fold, b)):
            spots_a, spots_b = fold.spots_for(a, slide), fold.spots_for(b, slide)
            if spots_a is None or spots_b is None:
                raise StevsInputError(
                    path, f"slide {slide} is in both {a} and {b} without a spot-level split"
                )
            shared = set(spots_a) & set(spots_b)
            if shared:
                raise StevsInputError(
                    path, f"{len(shared)} spot(s) of slide {slide} are in both {a} and {b}"
                )


def training_patch_cache(fold: Fold) -> Path | None:
    """The first training patch cache of a fold that exists on disk (None when none does)."""
    for slide in fold.train:
        path = Path(fold.slide_entry(slide).patches)
        if path.is_file():
            return path
    return None


def training_patch_scale(fold: Fold) -> dict[str, float] | None:
    """The patch scale of the first existing training patch cache of a fold (what a model
    trained on it saw), as :meth:`stevs.io.patch_cache.PatchScale.to_dict`; None without one."""
    from stevs.io.patch_cache import read_patch_scale

    path = training_patch_cache(fold)
    return None if path is None else read_patch_scale(path).to_dict()
