"""Leakage-free folds: which slides (or spots) train, validate and test, with their panel.

Two layers:

- :func:`plan_folds` / :func:`fold_names` (:mod:`stevs.fold_plan`) need only slide ids,
  patients, the scheme, ``k`` and the seed, so a workflow can know the folds while it builds
  its DAG, before any counts exist. The schemes and how validation is carved out are
  described there.
- :func:`make_folds` (``stevs folds``) reads the slide AnnDatas, splits spots for the
  within-slice scheme (or for validation blocks), chooses the gene panel and the normalisation
  statistics from each fold's training spots only, and writes one ``{fold}.json`` per fold plus
  ``folds.tsv``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stevs.atomic import atomic_write_text, check_replaceable, is_tsv_with
from stevs.cli import options_from_args
from stevs.errors import StevsInputError
from stevs.fold_plan import (
    LABEL_OF_SPLIT,
    FoldPlan,
    SlideBlocks,
    block_validation_labels,
    plan_folds,
    within_slice_labels,
)
from stevs.geometry import median_spot_pitch
from stevs.io.fold_file import (
    SCHEMES,
    SPLITS,
    Fold,
    SlideEntry,
    check_no_overlap,
    is_fold_file,
    patches_path,
    write_fold,
)
from stevs.io.samples import read_fixed_splits
from stevs.io.slide_adata import raw_counts, read_slide_adata, slide_meta
from stevs.options import (
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from stevs.panels import (
    NORMALISATIONS,
    PANEL_METHODS,
    TARGET_SUM,
    Panel,
    TrainingCounts,
    choose_panel,
    common_genes,
    library_sizes,
    normalisation_stats,
    read_gene_list,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCK_PITCHES = 4.0


# --------------------------------------------------------------------------------------------
# Building folds from slide AnnDatas
# --------------------------------------------------------------------------------------------


@dataclass
class SlideData:
    """What fold building needs from one slide AnnData."""

    slide: str
    patient: str
    adata_path: str
    patches_path: str
    barcodes: np.ndarray
    genes: list[str]
    counts: sp.csr_matrix
    library_size: np.ndarray
    coords_px: np.ndarray
    mpp: float | None
    pitch_um: float | None

    def pitch_px(self) -> float:
        """Spot pitch in level-0 px: from ``uns`` when known, else nearest-neighbour median."""
        if self.pitch_um and self.mpp:
            return float(self.pitch_um) / float(self.mpp)
        if len(self.coords_px) < 2:
            raise StevsInputError(self.adata_path, "cannot estimate the spot pitch of one spot")
        pitch = median_spot_pitch(self.coords_px)
        log.warning("%s: spot pitch unknown, estimated %.1f px", self.adata_path, pitch)
        return pitch

    def block_px(self, block_um: float | None) -> float:
        """Side of a spatial block in level-0 px (default: 4 spot pitches)."""
        if block_um is None:
            return DEFAULT_BLOCK_PITCHES * self.pitch_px()
        if not self.mpp:
            raise StevsInputError(self.adata_path, "--block-um needs uns['stevs']['mpp']")
        return float(block_um) / float(self.mpp)


def read_slide(path: str | PathLike, patches_dir: str | PathLike) -> SlideData:
    """Read a slide AnnData (``results/slides/{slide}.h5ad``) for fold building."""
    path = Path(path)
    adata = read_slide_adata(path, images=())
    meta = slide_meta(adata, path)
    if adata.n_vars == 0:
        raise StevsInputError(path, f"the slide has {adata.n_obs} spots and no genes")
    counts = raw_counts(adata, path)
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    slide, patient, mpp, pitch = meta.slide, meta.patient, meta.mpp, meta.spot_pitch_um
    if pitch is not None and not math.isfinite(pitch):
        pitch = None
    return SlideData(
        slide=slide,
        patient=str(patient),
        adata_path=os.fspath(path),
        patches_path=patches_path(patches_dir, slide),
        barcodes=np.asarray(adata.obs_names, dtype=str),
        genes=[str(g) for g in adata.var_names],
        counts=counts,
        library_size=library_sizes(counts),
        coords_px=coords,
        mpp=float(mpp) if mpp else None,
        pitch_um=float(pitch) if pitch else None,
    )


@dataclass
class FoldOptions:
    """Choices of ``stevs folds`` that shape every fold."""

    scheme: str = "leave_one_patient_out"
    k: int = 3
    seed: int = 0
    panel: str = "highly_variable"
    n_genes: int = 250
    gene_list: str | None = None
    n_headline: int = 50
    exclude_mito_ribo: bool = True
    normalisation: str = "log1p_cp10k"
    block_um: float | None = None
    buffer_pitches: float = 1.0
    splits: str | None = None  # scheme fixed: a table with a split column, or HEST's splits/


def _spot_split(
    plan: FoldPlan, index: int, slides: dict[str, SlideData], options: FoldOptions
) -> dict[str, dict[str, list[str]]] | None:
    """Barcode lists per split and slide where the fold splits slides into spots."""
    if plan.validation != "blocks":
        return None
    spots: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for slide in plan.train:
        data = slides[slide]
        blocks = SlideBlocks(
            pitch_px=data.pitch_px(),
            block_px=data.block_px(options.block_um),
            seed=options.seed,
            slide=slide,
            buffer_pitches=options.buffer_pitches,
            source=data.adata_path,
        )
        if options.scheme == "within_slice":
            labels = within_slice_labels(data.coords_px, blocks, options.k)[index]
        else:
            labels = block_validation_labels(data.coords_px, blocks, index)
        for split, label in LABEL_OF_SPLIT.items():
            if split == "test" and options.scheme != "within_slice":
                continue
            spots[split][slide] = data.barcodes[labels == label].tolist()
    if options.scheme != "within_slice":
        del spots["test"]
    for split, by_slide in spots.items():
        if not any(by_slide.values()):
            raise StevsInputError(
                ", ".join(slides[s].adata_path for s in plan.train),
                f"{plan.name}: no {split} spots are left after blocking and the buffer; "
                "use a smaller --block-um",
            )
    return spots


def _training_counts(
    plan: FoldPlan,
    spots: dict[str, dict[str, list[str]]] | None,
    slides: dict[str, SlideData],
    genes: list[str],
) -> TrainingCounts:
    blocks, libs, batch = [], [], []
    for slide in plan.train:
        data = slides[slide]
        rows = np.arange(len(data.barcodes))
        if spots is not None and slide in spots.get("train", {}):
            rows = np.flatnonzero(np.isin(data.barcodes, spots["train"][slide]))
        gene_pos = {g: i for i, g in enumerate(data.genes)}
        columns = np.asarray([gene_pos[g] for g in genes], dtype=np.int64)
        blocks.append(data.counts[rows][:, columns])
        libs.append(data.library_size[rows])
        batch.append(np.full(len(rows), slide, dtype=object))
    return TrainingCounts(
        counts=sp.vstack(blocks).tocsr(),
        library_size=np.concatenate(libs),
        batch=np.concatenate(batch).astype(str),
        genes=genes,
    )


def _count_spots(
    plan: FoldPlan, spots: dict[str, dict[str, list[str]]] | None, slides: dict[str, SlideData]
) -> dict[str, int]:
    counts = {}
    for split in SPLITS:
        total = 0
        for slide in getattr(plan, split):
            chosen = None if spots is None else spots.get(split, {}).get(slide)
            total += len(slides[slide].barcodes) if chosen is None else len(chosen)
        counts[split] = total
    return counts


def build_fold(
    plan: FoldPlan,
    index: int,
    slides: dict[str, SlideData],
    options: FoldOptions,
    gene_list: list[str] | None = None,
) -> Fold:
    """Split spots where needed, choose the panel and statistics: one :class:`Fold`."""
    in_fold = [s for s in slides if s in set(plan.train) | set(plan.val) | set(plan.test)]
    genes_by_slide = {s: slides[s].genes for s in in_fold}
    spots = _spot_split(plan, index, slides, options)
    training = _training_counts(plan, spots, slides, common_genes(genes_by_slide))
    panel: Panel = choose_panel(
        training,
        genes_by_slide,
        method=options.panel,
        n_genes=options.n_genes,
        gene_list=gene_list,
        gene_list_path=options.gene_list,
        n_headline=options.n_headline,
        exclude_mito_ribo=options.exclude_mito_ribo,
        fold_label=plan.name,
    )
    normalisation = normalisation_stats(training, panel.genes, options.normalisation, TARGET_SUM)
    if options.scheme == "within_slice":
        shared: list[str] = []
    else:
        test_patients = {slides[s].patient for s in plan.test}
        seen_patients = {slides[s].patient for s in plan.train + plan.val}
        shared = sorted(test_patients & seen_patients)
    fold = Fold(
        fold=plan.name,
        scheme=options.scheme,
        seed=options.seed,
        train=list(plan.train),
        val=list(plan.val),
        test=list(plan.test),
        genes=panel.genes,
        headline_genes=panel.headline_genes,
        panel=panel.info,
        normalisation=normalisation,
        slides=[
            SlideEntry(s, slides[s].patient, slides[s].adata_path, slides[s].patches_path)
            for s in in_fold
        ],
        spots=spots,
        validation=plan.validation,
        shared_patients=shared,
        n_spots=_count_spots(plan, spots, slides),
    )
    check_no_overlap(fold, None)
    return fold


def check_patches_dir(patches_dir: str | PathLike) -> None:
    """Refuse a patches folder that does not exist (fold files would point at nothing).

    Caches may still be missing inside an existing folder (the workflow tiles while folds are
    built); those are only logged.
    """
    folder = Path(patches_dir)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise StevsInputError(
            folder,
            f"patches folder {what}: give --patches-dir the folder 'stevs tile' wrote "
            "{slide}.h5 into (fold files record each cache's path there)",
        )


def make_folds(
    slide_paths: Sequence[str | PathLike],
    patches_dir: str | PathLike,
    out_dir: str | PathLike,
    options: FoldOptions,
) -> list[Fold]:
    """Read slides, build every fold, write ``{fold}.json`` files and ``folds.tsv``."""
    from tqdm import tqdm

    if options.panel not in PANEL_METHODS:
        raise StevsInputError(None, f"unknown panel {options.panel!r}; use one of {PANEL_METHODS}")
    gene_list = None
    if options.panel == "gene_list":
        if not options.gene_list:
            raise StevsInputError(None, "--panel gene_list needs --gene-list FILE")
        gene_list = read_gene_list(options.gene_list)
    records = [read_slide(p, patches_dir) for p in tqdm(slide_paths, desc="reading slides")]
    slides: dict[str, SlideData] = {}
    for record in records:
        if record.slide in slides:
            raise StevsInputError(
                record.adata_path,
                f"slide id {record.slide} is also used by {slides[record.slide].adata_path}",
            )
        slides[record.slide] = record
    missing = [r.slide for r in records if not Path(r.patches_path).is_file()]
    if missing:
        log.info("%s: no patch cache yet for %s", patches_dir, ", ".join(missing))
    splits = None
    if options.scheme == "fixed":
        if not options.splits:
            raise StevsInputError(None, "--scheme fixed needs --splits (sheet or HEST splits/)")
        splits = read_fixed_splits(options.splits, list(slides))
    plans = plan_folds(
        options.scheme,
        list(slides),
        [r.patient for r in records],
        k=options.k,
        seed=options.seed,
        splits=splits,
    )
    folds = []
    for index, plan in enumerate(tqdm(plans, desc="building folds")):
        fold = build_fold(plan, index, slides, options, gene_list)
        if fold.shared_patients:
            log.warning(
                "%s: patient(s) %s have sections in both training and test; use "
                "leave_one_patient_out or group_kfold to keep patients apart",
                plan.name,
                ", ".join(fold.shared_patients),
            )
        folds.append(fold)
    write_folds(folds, out_dir)
    return folds


def write_folds(folds: Sequence[Fold], out_dir: str | PathLike) -> None:
    """Write every ``{fold}.json`` and ``folds.tsv``, all or nothing.

    Called only once every fold is built; if a write fails (full disk, no permission), the
    files of this call already written are removed again.
    """
    out_dir = Path(out_dir)
    targets = {out_dir / f"{fold.fold}.json": is_fold_file for fold in folds}
    check_replaceable({**targets, out_dir / "folds.tsv": is_folds_summary})
    written: list[Path] = []
    try:
        for fold in folds:
            path = write_fold(fold, out_dir / f"{fold.fold}.json")
            written.append(path)
            fold.path = str(path)
        written.append(write_summary(folds, out_dir / "folds.tsv"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def is_folds_summary(path: Path) -> bool:
    """True for a ``folds.tsv`` :func:`write_summary` wrote."""
    return is_tsv_with(path, "fold", "scheme", "test")


def write_summary(folds: Sequence[Fold], path: str | PathLike) -> Path:
    """Write ``folds.tsv``: one row per fold, what it tests and how it was made."""
    columns = (
        "fold scheme seed validation train val test n_train_spots n_val_spots n_test_spots "
        "n_genes panel normalisation shared_patients"
    ).split()
    lines = ["\t".join(columns)]
    for fold in folds:
        row = [
            fold.fold,
            fold.scheme,
            str(fold.seed),
            fold.validation,
            ",".join(fold.train),
            ",".join(fold.val),
            ",".join(fold.test),
            str(fold.n_spots.get("train", "")),
            str(fold.n_spots.get("val", "")),
            str(fold.n_spots.get("test", "")),
            str(len(fold.genes)),
            str(fold.panel.get("method", "")),
            str(fold.normalisation.get("method", "")),
            ",".join(fold.shared_patients),
        ]
        lines.append("\t".join(row))
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n", replaces=is_folds_summary)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``stevs folds``."""
    parser.add_argument(
        "--slides", nargs="+", required=True, help="slide AnnDatas, in sample-sheet order"
    )
    parser.add_argument(
        "--patches-dir", default="results/patches", help="where {slide}.h5 patch caches live"
    )
    parser.add_argument(
        "--scheme", choices=SCHEMES, default="leave_one_patient_out", help="how slides are split"
    )
    parser.add_argument(
        "--splits",
        help="scheme fixed: a TSV with slide_id and split (train/val/test) columns, e.g. the "
        "sample sheet, or a HEST-Benchmark splits/ folder (train_i.csv, test_i.csv); default: "
        "the sample sheet's split column",
    )
    parser.add_argument(
        "--k",
        type=int_at_least(2),
        default=3,
        help="folds for group_kfold and within_slice (default 3)",
    )
    parser.add_argument(
        "--panel",
        choices=PANEL_METHODS,
        default="highly_variable",
        help="how each fold's gene panel is chosen (on its training slides only)",
    )
    parser.add_argument("--n-genes", type=positive_int(), default=250, help="panel size")
    parser.add_argument(
        "--gene-list",
        help="gene list file (one gene per line) for --panel gene_list (default: none)",
    )
    parser.add_argument("--n-headline", type=positive_int(), default=50, help="headline genes")
    parser.add_argument(
        "--keep-mito-ribo",
        action="store_true",
        help="let MT-/RPL/RPS genes into ranked panels (excluded by default)",
    )
    parser.add_argument(
        "--normalisation",
        choices=NORMALISATIONS,
        default="log1p_cp10k",
        help="expression targets: log1p of counts per 10,000, or another normalisation",
    )
    parser.add_argument(
        "--seed", type=non_negative_int(), default=0, help="seed of the random split choices"
    )
    parser.add_argument(
        "--block-um",
        type=positive_float(),
        default=None,
        help="side of the square spatial blocks in µm (default: 4 spot pitches)",
    )
    parser.add_argument(
        "--buffer-pitches",
        type=non_negative_float(),
        default=1.0,
        help="drop training spots within this many pitches of held-out spots (default 1)",
    )
    parser.add_argument("--out-dir", default="results/folds", help="folder of {fold}.json files")


def run(args: argparse.Namespace) -> int:
    """``stevs folds``: write the fold files."""
    check_patches_dir(args.patches_dir)
    options = options_from_args(FoldOptions, args, exclude_mito_ribo=not args.keep_mito_ribo)
    folds = make_folds(args.slides, args.patches_dir, args.out_dir, options)
    for fold in folds:
        log.info(
            "%s: test %s, val %s (%s), %d genes (%s)",
            fold.fold,
            ",".join(fold.test),
            ",".join(fold.val),
            fold.validation,
            len(fold.genes),
            fold.panel["method"],
        )
    return 0
