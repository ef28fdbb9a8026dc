"""The sample sheet: one row per slide (``config/samples.tsv``).

Columns: ``slide_id``, ``patient``, ``image``, ``expression``, ``format``, ``spots``
(legacy ST spot file; empty otherwise), ``mpp`` (microns per level-0 pixel, within
:data:`stevs.geometry.MPP_RANGE`; empty, row by row, to take it from the input's metadata,
the image or the spot grid; comes back as a float or None per row). Formats and their
``expression``: ``visium`` (Space Ranger ``outs/``), ``visium_hd`` (a
``binned_outputs/square_008um``-like bin folder, or the ``outs/`` above it), ``st``
(legacy ST count table + ``spots``), ``h5ad``, ``hest`` (a HEST-1k ``st/{id}.h5ad``; its
``metadata/{id}.json`` is read beside it and ``image`` may be left empty for
``wsis/{id}.tif``), ``spatialdata`` (a SpatialData ``.zarr`` store). Relative paths are
resolved against ``data_root`` when given, else against the sheet's own folder.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path

import pandas as pd

from stevs.errors import StevsInputError
from stevs.geometry import MPP_RANGE
from stevs.ids import SLIDE_ID_RULE, is_slide_id

REQUIRED_COLUMNS = ("slide_id", "image", "expression", "format")
OPTIONAL_COLUMNS = ("patient", "spots", "mpp", "split")
FORMATS = ("visium", "visium_hd", "st", "h5ad", "hest", "spatialdata")
PREDICT_REQUIRED_COLUMNS = ("slide_id", "image")
#: how alike (difflib ratio) an unknown column must be to an absent known one to be taken
#: for its typo: ``mmp`` for ``mpp`` (0.67), ``imgae`` for ``image``; ``notes`` (0.6 to
#: ``spots``) and other columns of a user's own pass
TYPO_CUTOFF = 0.65
#: values of the ``split`` column (fold scheme ``fixed``); empty = not in the fold
SPLIT_VALUES = ("train", "val", "test")


def hest_metadata_path(st_path: Path) -> Path:
    """``{root}/metadata/{id}.json`` of a HEST-1k ``{root}/st/{id}.h5ad``."""
    return st_path.parent.parent / "metadata" / f"{st_path.name.removesuffix('.h5ad')}.json"


def hest_image_path(st_path: Path) -> Path:
    """``{root}/wsis/{id}.tif`` of a HEST-1k ``{root}/st/{id}.h5ad``."""
    return st_path.parent.parent / "wsis" / f"{st_path.name.removesuffix('.h5ad')}.tif"


def _hest_patient(metadata: Path) -> str:
    """The ``patient`` of a HEST-1k sample's metadata JSON ("" when absent or unreadable:
    ingest reports a broken metadata file, naming it)."""
    try:
        value = json.loads(metadata.read_text()).get("patient")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return ""
    return "" if value is None else str(value).strip()


def _hest_defaults(table: pd.DataFrame, base: Path) -> None:
    """HEST rows: an empty ``image`` is ``wsis/{id}.tif`` beside the sample's ``st/`` folder,
    an empty ``patient`` the metadata's ``patient``."""
    if "format" not in table.columns or "expression" not in table.columns:
        return
    rows = (table["format"] == "hest") & (table["expression"] != "")
    for index in table.index[rows]:
        expression = Path(table.at[index, "expression"])
        if table.at[index, "image"] == "":
            table.at[index, "image"] = str(hest_image_path(expression))
        if table.at[index, "patient"] == "":
            table.at[index, "patient"] = _hest_patient(
                hest_metadata_path(Path(_resolve(str(expression), base)))
            )


def _resolve(value: str, base: Path) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path))


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StevsInputError(path, "sample sheet not found")
    if path.stat().st_size == 0:
        raise StevsInputError(path, "the sample sheet is empty (0 bytes): it needs a header row")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except pd.errors.EmptyDataError as err:
        raise StevsInputError(path, "the sample sheet has no header row (only comments?)") from err
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StevsInputError(path, f"cannot read sample sheet: {err}") from err
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda column: column.str.strip())


def check_column_names(path: Path, table: pd.DataFrame, known: tuple[str, ...]) -> None:
    """Refuse a column that looks like a typo of a known one the sheet lacks (``mmp`` for
    ``mpp`` would be ignored, not read): "did you mean". Other extra columns pass."""
    every = {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *PREDICT_REQUIRED_COLUMNS}
    absent = [c for c in known if c not in table.columns]
    for column in table.columns:
        if column in every:
            continue
        close = difflib.get_close_matches(column.lower(), absent, n=1, cutoff=TYPO_CUTOFF)
        if close:
            raise StevsInputError(
                path,
                f"unknown column '{column}': did you mean '{close[0]}'? (rename it, or remove "
                f"it if it is not meant as '{close[0]}')",
            )


def _row_error(path: Path, table: pd.DataFrame, index: int, problem: str) -> StevsInputError:
    slide = table.at[index, "slide_id"] if "slide_id" in table.columns else "?"
    # line 1 is the header, so data row i sits on line i + 2
    return StevsInputError(path, f"row {index + 2} (slide '{slide}'): {problem}")


def _check_slide_ids(path: Path, table: pd.DataFrame) -> None:
    for index, slide in table["slide_id"].items():
        if not is_slide_id(slide):
            raise _row_error(path, table, index, f"slide_id must be {SLIDE_ID_RULE}")
    duplicated = table["slide_id"].duplicated(keep="first")
    if duplicated.any():
        index = int(duplicated.idxmax())
        raise _row_error(path, table, index, "duplicate slide_id")


def _parse_mpp(path: Path, table: pd.DataFrame) -> pd.Series:
    """The ``mpp`` column as float or None per row (object dtype: an empty cell stays None,
    never NaN), each given value within :data:`MPP_RANGE`."""
    values: list[float | None] = []
    for index, raw in table["mpp"].items():
        if raw == "":
            values.append(None)
            continue
        try:
            value = float(raw)
        except ValueError:
            raise _row_error(path, table, index, f"mpp '{raw}' is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise _row_error(path, table, index, f"mpp must be positive, got {raw}")
        if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
            raise _row_error(
                path,
                table,
                index,
                f"mpp {raw} µm/px is outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px: "
                "microns per pixel of the full-resolution image (e.g. 0.25 at 40x, 0.5 at 20x)",
            )
        values.append(value)
    return pd.Series(values, index=table.index, dtype=object)


def read_sample_sheet(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    require_patient: bool = False,
    check_paths: bool = True,
) -> pd.DataFrame:
    """Read and validate a sample sheet; paths come back absolute, ``mpp`` as float/None.

    Every problem raises :class:`StevsInputError` naming the sheet, the row and the problem.
    """
    path = Path(path)
    table = _read_table(path)
    check_column_names(path, table, REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise StevsInputError(
            path, f"missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}"
        )
    if table.empty:
        raise StevsInputError(path, "sample sheet has no rows")
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    base = Path(data_root) if data_root else path.parent
    _hest_defaults(table, base)
    if require_patient:
        if (table["patient"] == "").all():
            raise StevsInputError(
                path, "column 'patient' is missing or empty, but the fold scheme groups by patient"
            )
        for index in table.index[table["patient"] == ""]:
            raise _row_error(path, table, index, "patient is empty")
    for column in REQUIRED_COLUMNS:
        for index in table.index[table[column] == ""]:
            raise _row_error(path, table, index, f"'{column}' is empty")
    _check_slide_ids(path, table)
    for index, fmt in table["format"].items():
        if fmt not in FORMATS:
            raise _row_error(
                path, table, index, f"format '{fmt}' unknown; use one of {', '.join(FORMATS)}"
            )
        if fmt == "st" and table.at[index, "spots"] == "":
            raise _row_error(path, table, index, "format 'st' needs a spot file in 'spots'")
    table["mpp"] = _parse_mpp(path, table)
    for index, split in table["split"].items():
        if split not in ("", *SPLIT_VALUES):
            raise _row_error(path, table, index, f"split '{split}' must be train, val or test")
    table.loc[table["patient"] == "", "patient"] = table["slide_id"]
    for column in ("image", "expression", "spots"):
        table[column] = [_resolve(v, base) if v else "" for v in table[column]]
    if check_paths:
        for index, row in table.iterrows():
            for column in ("image", "expression", "spots"):
                if row[column] and not Path(row[column]).exists():
                    raise _row_error(path, table, index, f"{column} '{row[column]}' does not exist")
    return table.set_index("slide_id", drop=False)


def read_predict_sheet(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, check_paths: bool = True
) -> pd.DataFrame:
    """Read the sheet of H&E-only slides (``slide_id``, ``image``, optional ``mpp``)."""
    path = Path(path)
    table = _read_table(path)
    check_column_names(path, table, (*PREDICT_REQUIRED_COLUMNS, "mpp"))
    missing = [c for c in PREDICT_REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise StevsInputError(path, f"missing column(s) {', '.join(missing)}")
    if table.empty:
        raise StevsInputError(path, "sheet has no rows")
    if "mpp" not in table.columns:
        table["mpp"] = ""
    _check_slide_ids(path, table)
    table["mpp"] = _parse_mpp(path, table)
    base = Path(data_root) if data_root else path.parent
    table["image"] = [_resolve(v, base) for v in table["image"]]
    if check_paths:
        for index, image in table["image"].items():
            if not Path(image).is_file():
                raise _row_error(path, table, index, f"image '{image}' does not exist")
    return table.set_index("slide_id", drop=False)


def _hest_split_files(folder: Path) -> list[tuple[Path, Path]]:
    """HEST-Benchmark's ``splits/train_{i}.csv`` + ``test_{i}.csv`` pairs, i = 0, 1, ..."""
    pairs = []
    while (folder / f"train_{len(pairs)}.csv").is_file():
        i = len(pairs)
        test = folder / f"test_{i}.csv"
        if not test.is_file():
            raise StevsInputError(test, f"split {i} has a train_{i}.csv but no test_{i}.csv")
        pairs.append((folder / f"train_{i}.csv", test))
    if not pairs:
        raise StevsInputError(folder, "no train_0.csv / test_0.csv (HEST-Benchmark splits)")
    return pairs


def _split_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StevsInputError(path, f"cannot read split file: {err}") from err
    for column in columns:
        if column not in table.columns:
            raise StevsInputError(path, f"no '{column}' column")
    return table


def _split_ids(path: Path, column: str) -> list[str]:
    table = _split_table(path, (column,))
    return [str(v).strip() for v in table[column] if str(v).strip()]


#: columns of HEST-Benchmark's split files (``bench_data/{task}/splits/train_{i}.csv``)
HEST_SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")


def read_hest_bench_splits(
    folder: str | os.PathLike,
) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """HEST-Benchmark's splits of one task: per split i, the rows of ``train_{i}.csv`` and
    ``test_{i}.csv`` (``sample_id``, ``patches_path``, ``expr_path``, paths relative to the
    task folder), in file order, as HEST's ``predict_single_split`` reads them."""
    splits = []
    for train, test in _hest_split_files(Path(folder)):
        pair = []
        for path in (train, test):
            table = _split_table(path, HEST_SPLIT_COLUMNS)
            rows = [{c: str(r[c]).strip() for c in HEST_SPLIT_COLUMNS} for _, r in table.iterrows()]
            if not rows:
                raise StevsInputError(path, "the split names no sample")
            pair.append(rows)
        splits.append((pair[0], pair[1]))
    return splits


def read_fixed_splits(path: str | os.PathLike, slide_ids: list[str]) -> list[dict[str, str]]:
    """Fold scheme ``fixed``: per fold, slide -> ``train`` / ``val`` / ``test``.

    ``path`` is either a table with ``slide_id`` and ``split`` columns (a sample sheet: one
    fold; empty split = not in it) or a HEST-Benchmark ``splits/`` folder (fold i from
    ``train_{i}.csv`` and ``test_{i}.csv``, samples by ``sample_id``). Every named slide must
    be among ``slide_ids``; every fold needs a training and a test slide.
    """
    path = Path(path)
    if path.is_dir():
        folds = []
        for train, test in _hest_split_files(path):
            split = {s: "train" for s in _split_ids(train, "sample_id")}
            split.update({s: "test" for s in _split_ids(test, "sample_id")})
            folds.append((test, split))
    else:
        if not path.is_file():
            raise StevsInputError(path, "split file or HEST splits folder not found")
        table = _read_table(path)
        for column in ("slide_id", "split"):
            if column not in table.columns:
                raise StevsInputError(path, f"no '{column}' column (fold scheme fixed)")
        rows = table.loc[table["split"] != ""]
        bad = sorted(set(rows["split"]) - set(SPLIT_VALUES))
        if bad:
            raise StevsInputError(path, f"split values must be train, val or test, not {bad}")
        folds = [(path, dict(zip(rows["slide_id"], rows["split"], strict=True)))]
    known = set(slide_ids)
    for where, split in folds:
        unknown = sorted(set(split) - known)
        if unknown:
            raise StevsInputError(
                where, f"{len(unknown)} slide(s) not in the sample sheet, e.g. {unknown[:3]}"
            )
        for needed in ("train", "test"):
            if needed not in split.values():
                raise StevsInputError(where, f"no {needed} slide in this split")
    return [split for _, split in folds]
