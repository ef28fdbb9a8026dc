"""Fold planning, before any counts are read: which slides, and which spots, go where.

Slide level: :func:`plan_folds` / :func:`fold_names` need only slide ids, patients, the scheme,
``k`` and the seed, so a workflow can know the folds while it builds its DAG. Spot level:
:func:`within_slice_labels` and :func:`block_validation_labels` split one slide's spots by
square spatial blocks, with a buffer. :mod:`stevs.folds` (``stevs folds``) builds and writes
the folds from these plans.

Schemes: ``leave_one_slide_out`` (one fold per slide, in input order), ``leave_one_patient_out``
(one fold per patient, in order of first appearance), ``group_kfold`` (``k`` folds over
patients), ``within_slice`` (``k`` folds over square spatial blocks of every slide), ``fixed``
(the splits given: a sample sheet's ``split`` column, one fold, or HEST-Benchmark's
``splits/train_{i}.csv`` + ``test_{i}.csv``, one fold each).

Validation comes from training slides only: a whole training patient (patient schemes, when at
least two training patients remain), else a whole training slide (when at least two remain),
else spatial blocks of the one training slide. Spots are never shared between splits; where
splits share a slide (within-slice folds, block validation), training and validation spots
closer than ``buffer_pitches`` spot pitches (+5% for spot-position jitter) to a held-out spot
are dropped, so every kept training spot lies more than one pitch from every test spot.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stevs.errors import StevsInputError
from stevs.io.fold_file import SCHEMES, SPLITS

VALIDATION_MODES = ("slide", "patient", "blocks")
VAL_BLOCK_FRACTION = 0.2
BUFFER_TOLERANCE = 1.05  # spot centres jitter by a few px around the ideal grid

# spot labels used while splitting a slide's spots
DROPPED, TRAIN, VAL, TEST = -1, 0, 1, 2
LABEL_OF_SPLIT = {"train": TRAIN, "val": VAL, "test": TEST}


# --------------------------------------------------------------------------------------------
# Planning: slide ids + patients (+ seed) only
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldPlan:
    """Slide-level split of one fold; ``validation`` says how val was carved out."""

    name: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    validation: str


def _check_slides(slide_ids: Sequence[str], patients: Sequence[str]) -> None:
    if len(slide_ids) != len(patients):
        raise StevsInputError(None, "need exactly one patient per slide")
    if not slide_ids:
        raise StevsInputError(None, "no slides given")
    seen: set[str] = set()
    duplicates = sorted({s for s in slide_ids if s in seen or seen.add(s)})
    if duplicates:
        raise StevsInputError(None, f"slide ids must be unique; repeated: {', '.join(duplicates)}")


def _unique_in_order(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def fold_names(
    scheme: str,
    slide_ids: Sequence[str],
    patients: Sequence[str],
    k: int = 3,
    splits: Sequence[Mapping[str, str]] | None = None,
) -> list[str]:
    """Fold names (``fold0``, ``fold1``, ...) from the sample sheet alone: as many as the scheme
    makes; raises :class:`StevsInputError` if it cannot work."""
    _check_slides(slide_ids, patients)
    n_patients = len(set(patients))
    if scheme == "fixed":
        if not splits:
            raise StevsInputError(
                None, "fold scheme fixed needs splits (a 'split' column or HEST split files)"
            )
        count = len(splits)
    elif scheme == "leave_one_slide_out":
        if len(slide_ids) < 2:
            raise StevsInputError(
                None, "leave_one_slide_out needs at least 2 slides; use within_slice for one"
            )
        count = len(slide_ids)
    elif scheme == "leave_one_patient_out":
        if n_patients < 2:
            raise StevsInputError(
                None,
                f"leave_one_patient_out needs at least 2 patients, but all {len(slide_ids)} "
                f"slides belong to patient {patients[0]!r}; use within_slice (or fix the "
                "patient column of the sample sheet)",
            )
        count = n_patients
    elif scheme == "group_kfold":
        if k < 2:
            raise StevsInputError(None, f"group_kfold needs k >= 2, got {k}")
        if k > n_patients:
            raise StevsInputError(
                None,
                f"group_kfold with k={k} needs at least {k} patients, but there are "
                f"{n_patients}; lower --k or use leave_one_patient_out",
            )
        count = k
    elif scheme == "within_slice":
        if k < 2:
            raise StevsInputError(None, f"within_slice needs k >= 2, got {k}")
        count = k
    else:
        raise StevsInputError(None, f"unknown fold scheme {scheme!r}; use one of {SCHEMES}")
    return [f"fold{i}" for i in range(count)]


def _fixed_plans(
    slide_ids: list[str],
    patient_of: dict[str, str],
    splits: Sequence[Mapping[str, str]],
    seed: int,
) -> list[FoldPlan]:
    """Scheme ``fixed``: the given splits; without ``val`` slides, validation is carved out
    of the training slides as in the other schemes (a patient, else a slide, else blocks)."""
    plans = []
    for i, split in enumerate(splits):
        train, val, test = ([s for s in slide_ids if split.get(s) == x] for x in SPLITS)
        how = "slide"
        if not val:
            rng = np.random.default_rng([seed, i])
            train, val, how = _carve_validation(train, patient_of, rng, by_patient=True)
        plans.append(FoldPlan(f"fold{i}", tuple(train), tuple(val), tuple(test), how))
    return plans


def _carve_validation(
    train: list[str], patient_of: dict[str, str], rng: np.random.Generator, by_patient: bool
) -> tuple[list[str], list[str], str]:
    """Split training slides into (train, val, how)."""
    train_patients = _unique_in_order([patient_of[s] for s in train])
    if by_patient and len(train_patients) >= 2:
        chosen = train_patients[int(rng.integers(len(train_patients)))]
        val = [s for s in train if patient_of[s] == chosen]
        return [s for s in train if patient_of[s] != chosen], val, "patient"
    if len(train) >= 2:
        chosen = train[int(rng.integers(len(train)))]
        return [s for s in train if s != chosen], [chosen], "slide"
    return list(train), list(train), "blocks"


def plan_folds(
    scheme: str,
    slide_ids: Sequence[str],
    patients: Sequence[str],
    k: int = 3,
    seed: int = 0,
    splits: Sequence[Mapping[str, str]] | None = None,
) -> list[FoldPlan]:
    """Assign slides to train/val/test for every fold; deterministic for a seed.

    ``splits`` (scheme ``fixed`` only): per fold, slide -> train / val / test
    (:func:`stevs.io.samples.read_fixed_splits`).
    """
    count = len(fold_names(scheme, slide_ids, patients, k, splits))
    if seed < 0:
        raise StevsInputError(None, f"the seed must be >= 0, got {seed}")
    slide_ids = list(slide_ids)
    patient_of = dict(zip(slide_ids, patients, strict=True))
    if scheme == "fixed":
        return _fixed_plans(slide_ids, patient_of, splits or [], seed)
    if scheme == "within_slice":
        every = tuple(slide_ids)
        return [FoldPlan(f"fold{i}", every, every, every, "blocks") for i in range(count)]

    if scheme == "leave_one_slide_out":
        test_sets = [[s] for s in slide_ids]
    elif scheme == "leave_one_patient_out":
        test_sets = [
            [s for s in slide_ids if patient_of[s] == p] for p in _unique_in_order(patients)
        ]
    else:  # group_kfold: shuffled patients, biggest first, each to the group with fewest slides
        order = _unique_in_order(patients)
        order = [order[i] for i in np.random.default_rng([seed]).permutation(len(order))]
        sizes = {p: sum(patient_of[s] == p for s in slide_ids) for p in order}
        order.sort(key=lambda p: -sizes[p])
        groups: list[list[str]] = [[] for _ in range(count)]
        loads = [0] * count
        for p in order:
            target = int(np.argmin(loads))
            groups[target].append(p)
            loads[target] += sizes[p]
        test_sets = [[s for s in slide_ids if patient_of[s] in set(g)] for g in groups]

    plans = []
    for i, test in enumerate(test_sets):
        rest = [s for s in slide_ids if s not in set(test)]
        rng = np.random.default_rng([seed, i])
        train, val, how = _carve_validation(
            rest, patient_of, rng, by_patient=scheme != "leave_one_slide_out"
        )
        plans.append(FoldPlan(f"fold{i}", tuple(train), tuple(val), tuple(test), how))
    return plans


# --------------------------------------------------------------------------------------------
# Spatial blocks and buffers
# --------------------------------------------------------------------------------------------


def block_ids(coords_px: np.ndarray, block_px: float) -> np.ndarray:
    """Index (0..B-1) of the square block of side ``block_px`` holding each spot."""
    coords_px = np.asarray(coords_px, dtype=np.float64)
    cells = np.floor((coords_px - coords_px.min(axis=0)) / block_px).astype(np.int64)
    _, ids = np.unique(cells, axis=0, return_inverse=True)
    return np.asarray(ids).ravel()


def apply_buffer(coords_px: np.ndarray, labels: np.ndarray, min_gap_px: float) -> np.ndarray:
    """Drop train/val spots within ``min_gap_px`` of a test spot, then train spots near val."""
    from scipy.spatial import cKDTree

    labels = labels.copy()
    for held_out, to_thin in ((TEST, (TRAIN, VAL)), (VAL, (TRAIN,))):
        held = labels == held_out
        thin = np.isin(labels, to_thin)
        if not held.any() or not thin.any():
            continue
        distance, _ = cKDTree(coords_px[held]).query(coords_px[thin], k=1)
        rows = np.flatnonzero(thin)[distance < min_gap_px]
        labels[rows] = DROPPED
    return labels


def _slide_key(slide: str) -> int:
    return zlib.crc32(slide.encode("utf-8"))


def _choose_val_blocks(blocks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n_val = min(max(1, round(VAL_BLOCK_FRACTION * len(blocks))), len(blocks) - 1)
    return rng.choice(blocks, size=n_val, replace=False)


@dataclass(frozen=True)
class SlideBlocks:
    """How one slide's spots are cut into square blocks, and the buffer kept around held-out
    spots (``source``: the slide's file, for messages)."""

    pitch_px: float
    block_px: float
    seed: int
    slide: str
    buffer_pitches: float = 1.0
    source: str | None = None

    @property
    def min_gap_px(self) -> float:
        """Train/val spots closer than this to a held-out spot are dropped."""
        return self.buffer_pitches * self.pitch_px * BUFFER_TOLERANCE


def within_slice_labels(coords_px: np.ndarray, blocks: SlideBlocks, k: int) -> list[np.ndarray]:
    """Spot labels (TRAIN/VAL/TEST/DROPPED) of one slide for each of ``k`` within-slice folds.

    Blocks are shuffled (seed + slide id) and dealt into ``k`` test groups, so every spot is
    tested exactly once; validation blocks come from the remaining blocks.
    """
    ids = block_ids(coords_px, blocks.block_px)
    n_blocks = int(ids.max()) + 1
    if n_blocks < k + 1:
        raise StevsInputError(
            blocks.source,
            f"slide {blocks.slide} has {n_blocks} spatial block(s) of {blocks.block_px:.0f} px "
            f"but within_slice with k={k} needs at least {k + 1}; use a smaller --block-um or --k",
        )
    key = _slide_key(blocks.slide)
    order = np.random.default_rng([blocks.seed, key]).permutation(n_blocks)
    result = []
    for i, test_blocks in enumerate(np.array_split(order, k)):
        rest = np.setdiff1d(order, test_blocks)
        val_blocks = _choose_val_blocks(rest, np.random.default_rng([blocks.seed, key, i + 1]))
        labels = np.full(len(ids), TRAIN, dtype=np.int8)
        labels[np.isin(ids, val_blocks)] = VAL
        labels[np.isin(ids, test_blocks)] = TEST
        result.append(apply_buffer(coords_px, labels, blocks.min_gap_px))
    return result


def block_validation_labels(
    coords_px: np.ndarray, blocks: SlideBlocks, fold_index: int
) -> np.ndarray:
    """Spot labels (TRAIN/VAL/DROPPED) carving validation blocks out of one training slide."""
    ids = block_ids(coords_px, blocks.block_px)
    n_blocks = int(ids.max()) + 1
    if n_blocks < 2:
        raise StevsInputError(
            blocks.source,
            f"slide {blocks.slide} is the only training slide and has a single spatial block of "
            f"{blocks.block_px:.0f} px, so no validation blocks can be carved out; use a smaller "
            "--block-um",
        )
    rng = np.random.default_rng([blocks.seed, _slide_key(blocks.slide), 1_000_003 + fold_index])
    val_blocks = _choose_val_blocks(np.arange(n_blocks), rng)
    labels = np.full(len(ids), TRAIN, dtype=np.int8)
    labels[np.isin(ids, val_blocks)] = VAL
    return apply_buffer(coords_px, labels, blocks.min_gap_px)
