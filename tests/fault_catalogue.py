"""The catalogue of fault classes (issues 14, 24 and 25): each case a new user met, or may
meet, with the outcome its test asserts.

``clear error``: exit code 2 (130 for Ctrl-C) and one line naming the file or the option and
the problem; no output that looks valid, no file of the user's changed. ``right``: the
correct result. No case may end in a traceback or in a silently wrong result: each has a
test asserting its outcome (``tests/test_faults.py`` checks that every case names a test
that is there, and that every test there is a case). Parametrised tests of test_faults.py
take their cases from here (:func:`params`).

``python tests/fault_catalogue.py`` prints the counts and the table of docs/faults.md (a test
checks that the page is current).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

CLEAR = "clear error"
RIGHT = "right"
OUTCOMES = (CLEAR, RIGHT)
#: subcommands with an output path, in the order test_faults.commands lists them
SUBCOMMANDS = ("demo", "ingest", "tile", "folds", "train", "predict", "evaluate", "report",
               "predict-slide")  # fmt: skip
DEVICE_SUBCOMMANDS = ("train", "predict", "predict-slide")


@dataclass(frozen=True)
class Case:
    """One fault class: what the user does, the outcome, where it is asserted."""

    fault: str
    outcome: str
    test: str  # "test_module.py::test_name"
    source: str  # the issue that spelled it out ("14", "24", "25"), or "rebuilt"
    id: str | None = None  # the pytest id of a parametrised test's case
    params: tuple[Any, ...] = ()  # that case's parameters

    @property
    def node(self) -> str:
        """The test's pytest node id (relative to tests/)."""
        return self.test + (f"[{self.id}]" if self.id else "")


def _faults(name: str) -> str:
    return f"test_faults.py::{name}"


def _each(fault: str, outcome: str, test: str, source: str, ids: tuple[str, ...]) -> list[Case]:
    """One case per parameter of a test parametrised by a name alone."""
    return [Case(f"{fault} ({i})", outcome, _faults(test), source, i, (i,)) for i in ids]


def _sheet(ident: str, fault: str, edit: Any, message: str) -> Case:
    test = _faults("test_bad_sample_sheet_is_one_line_naming_it")
    return Case(fault, CLEAR, test, "14", ident, (edit, message))


SAMPLE_SHEETS = [
    _sheet("zero-bytes", "sample sheet of 0 bytes", None, "the sample sheet is empty (0 bytes)"),
    _sheet("no-rows", "sample sheet with a header only", lambda t: t.iloc[:0],
           "sample sheet has no rows"),
    _sheet("no-format", "sample sheet without a format column",
           lambda t: t.drop(columns="format"), "missing column(s) format"),
    _sheet("duplicate-id", "duplicate slide_id", lambda t: t.assign(slide_id="demo_1"),
           "row 3 (slide 'demo_1'): duplicate slide_id"),
    _sheet("bad-format", "unknown format", lambda t: t.assign(format="visum"),
           "format 'visum' unknown"),
    _sheet("mpp-text", "mpp not a number", lambda t: t.assign(mpp="two"),
           "mpp 'two' is not a number"),
    _sheet("mpp-negative", "negative mpp", lambda t: t.assign(mpp="-1"), "mpp must be positive"),
    _sheet("mpp-range", "mpp out of range", lambda t: t.assign(mpp="250"),
           "mpp 250 µm/px is outside 0.05-20 µm/px"),
    _sheet("missing-image", "image that does not exist",
           lambda t: t.assign(image="/nowhere/x.tif"), "image '/nowhere/x.tif' does not exist"),
    _sheet("bad-id", "slide_id with a space", lambda t: t.assign(slide_id="demo 1"),
           "slide_id must be"),
]  # fmt: skip


def _number(ident: str, argv: list[str], message: str, source: str = "25") -> Case:
    test = _faults("test_the_issues_numbers_are_refused_before_any_work")
    return Case(" ".join(argv), CLEAR, test, source, ident, (argv, message))


NUMBERS = [
    _number("lr-nan", ["train", "--lr", "nan"], "argument --lr: must be > 0, got nan"),
    _number("lr-negative", ["train", "--lr=-1"], "argument --lr: must be > 0, got -1"),
    _number("lr-zero", ["train", "--lr", "0", "--lr-backbone", "0"],
            "argument --lr: must be > 0, got 0"),
    _number("patience", ["train", "--patience", "-1"],
            "argument --patience: must be a whole number >= 1"),
    _number("latent-dim", ["train", "--latent-dim", "0"],
            "argument --latent-dim: must be a whole number >= 1"),
    _number("headline-negative", ["folds", "--n-headline", "-3"],
            "argument --n-headline: must be a whole number >= 1"),
    _number("headline-zero", ["folds", "--n-headline", "0"],
            "argument --n-headline: must be a whole number >= 1"),
    _number("train-workers", ["train", "--workers", "-1"],
            "argument --workers: must be a whole number >= 0"),
    _number("predict-workers", ["predict", "--workers", "-1"],
            "argument --workers: must be a whole number >= 0"),
    _number("folds-k-one", ["folds", "--k", "1"], "argument --k: must be a whole number >= 2",
            "rebuilt"),
    _number("samples-negative", ["predict-slide", "--samples", "-1"],
            "argument --samples: must be a whole number >= 0", "rebuilt"),
    _number("map-slides-negative", ["report", "--max-map-slides", "-1"],
            "argument --max-map-slides: must be a whole number >= 0", "rebuilt"),
    _number("genes-inf", ["folds", "--n-genes", "inf"],
            "argument --n-genes: must be a whole number >= 1", "rebuilt"),
]  # fmt: skip


def _typo(ident: str, rename: dict[str, str], message: str, source: str = "25") -> Case:
    test = _faults("test_a_sample_sheet_column_typo_is_refused_with_did_you_mean")
    fault = f"sample sheet column '{next(iter(rename.values()))}'"
    return Case(fault, CLEAR, test, source, ident, (rename, message))


COLUMN_TYPOS = [
    _typo("mmp", {"mpp": "mmp"}, "unknown column 'mmp': did you mean 'mpp'?"),
    _typo("patients", {"patient": "patients"},
          "unknown column 'patients': did you mean 'patient'?", "rebuilt"),
    _typo("imgae", {"image": "imgae"}, "unknown column 'imgae': did you mean 'image'?",
          "rebuilt"),
    _typo("case", {"spots": "Spots"}, "unknown column 'Spots': did you mean 'spots'?", "rebuilt"),
]  # fmt: skip


def _user_file(ident: str, command: str, name: str, kind: str, source: str = "rebuilt") -> Case:
    """A file of the user's at the path a writer writes: refused naming it, left as it was."""
    test = _faults("test_a_users_file_at_an_output_path_is_left_untouched")
    fault = f"`stevs {command}` onto a user's {name}"
    return Case(fault, CLEAR, test, source, ident, (command, name, kind))


USER_FILES = [
    _user_file("evaluate-tsv", "evaluate", "fold0.tsv", "tsv"),
    _user_file("evaluate-summary", "evaluate", "fold0.summary.tsv", "tsv"),
    _user_file("folds-json", "folds", "fold0.json", "json"),
    _user_file("folds-tsv", "folds", "folds.tsv", "tsv"),
    _user_file("report-html", "report", "index.html", "html"),
    _user_file("report-tsv", "report", "summary.tsv", "tsv"),
    _user_file("train-config", "train", "config.json", "json"),
    _user_file("train-metrics", "train", "metrics.csv", "csv"),
    _user_file("train-log", "train", "train.log", "text"),
    _user_file("predict-slide-png", "predict-slide", "tissue.png", "png"),
    _user_file("tile-qc-png", "tile", "qc.png", "png"),
]

RERUNS = [
    Case(f"`stevs {name}` rerun over its own earlier output: replaced", RIGHT,
         _faults("test_a_rerun_replaces_its_own_earlier_outputs"), "rebuilt", name, (name,))
    for name in ("evaluate", "folds", "report", "train", "tile")
]  # fmt: skip

SPACERANGER = [
    Case("Space Ranger hires PNG (no full-resolution scan) as the image: ingested at its scale",
         RIGHT, "test_ingest_demo.py::test_spaceranger_png_as_the_image_is_ingested_at_its_scale",
         "24", "hires", ("hires",)),
    Case("Space Ranger lowres PNG as the image: ingested at its scale", RIGHT,
         "test_ingest_demo.py::test_spaceranger_png_as_the_image_is_ingested_at_its_scale",
         "rebuilt", "lowres", ("lowres",)),
    Case("Space Ranger hires PNGs: ingest, tile, train, predict; drawn with img_key hires and "
         "lowres", RIGHT,
         "test_ingest_demo.py::test_spaceranger_hires_pngs_ingest_tile_and_predict", "24"),
    Case("Space Ranger PNG beside scale factors that are not JSON", CLEAR,
         _faults("test_spaceranger_png_with_broken_scale_factors_is_one_line"), "rebuilt",
         "not-json", ("{tissue_hires_scalef: 0.4", "invalid JSON")),
    Case("Space Ranger PNG beside scale factors without its scale factor", CLEAR,
         _faults("test_spaceranger_png_with_broken_scale_factors_is_one_line"), "rebuilt",
         "no-scalef", ('{"spot_diameter_fullres": 90}', "tissue_hires_scalef must be a positive")),
]  # fmt: skip


def _plain(fault: str, outcome: str, test: str, source: str) -> Case:
    return Case(fault, outcome, test if "::" in test else _faults(test), source)


PLAIN = [
    _plain("a write fails inside the library writing the file", CLEAR,
           "test_a_write_failing_inside_the_writer_is_one_line", "14"),
    _plain("an output folder the command creates cannot be created", CLEAR,
           "test_permission_error_outside_the_atomic_writer_is_one_line", "14"),
    _plain("--out names an existing folder", CLEAR,
           "test_output_path_taken_by_a_folder_is_one_line", "14"),
    _plain("temporary files of a killed run", RIGHT,
           "test_stale_temporary_files_of_a_killed_run_are_removed", "14"),
    _plain("mpp given on some sheet rows only", RIGHT,
           "test_mpp_given_on_some_rows_only_means_not_given_on_the_others", "14"),
    _plain("spot coordinates in hires px for the full-resolution image", CLEAR,
           "test_spots_in_hires_pixels_are_refused_with_the_fix", "14"),
    _plain("her2st spots at another scale or on another section's image", CLEAR,
           "test_spot_check_passes_every_her2st_section_and_refuses_wrong_spots", "25"),
    _plain("folds with a patches folder that does not exist", CLEAR,
           "test_folds_with_a_missing_patches_dir_write_nothing", "14"),
    _plain("a fold that cannot be built beside one that can", CLEAR,
           "test_a_failing_fold_leaves_no_fold_file", "14"),
    _plain("the disk fills between fold files", CLEAR,
           "test_a_fold_write_failing_removes_the_folds_written", "14"),
    _plain("a damaged or truncated patch cache", CLEAR,
           "test_damaged_patch_cache_names_the_cache", "14"),
    _plain("a damaged cache read in a DataLoader worker", CLEAR,
           "test_damaged_cache_read_in_a_dataloader_worker_is_one_line", "14"),
    _plain("tissue_positions_list.csv with a header line (or .csv without)", RIGHT,
           "test_positions_list_with_a_header_line_is_read", "14"),
    _plain("equal weights written by separate processes", RIGHT,
           "test_equal_weights_give_byte_identical_files_in_separate_processes", "14"),
    _plain("resuming with another preset", RIGHT,
           "test_resuming_with_another_preset_trains_from_scratch", "14"),
    _plain("training diverging to NaN", CLEAR,
           "test_divergence_to_nan_names_the_epoch_and_writes_no_weights", "14"),
    _plain("export over a user's folder (deleted it)", CLEAR,
           "test_export_over_a_users_folder_leaves_it_untouched", "25"),
    _plain("demo --out into a user's folder", CLEAR,
           "test_demo_into_a_users_folder_changes_nothing", "25"),
    _plain("ingest, tile, predict over a user's .h5ad / HDF5 / slide AnnData", CLEAR,
           "test_file_writers_replace_only_their_own_kind", "25"),
    _plain("a prediction of part of the test spots", CLEAR,
           "test_a_prediction_of_part_of_the_test_spots_is_not_scored", "25"),
    _plain("a test slide without a prediction file", CLEAR,
           "test_a_test_slide_without_a_prediction_is_not_scored", "rebuilt"),
    _plain("a report comparing runs scored on other folds", CLEAR,
           "test_report_does_not_compare_runs_scored_on_other_folds", "25"),
    _plain("Ctrl-C during training (exit 130)", CLEAR,
           "test_ctrl_c_during_training_is_one_line_with_the_checkpoint", "25"),
    _plain("a numeric option without a stated range", CLEAR,
           "test_every_numeric_option_states_its_range_in_its_help", "25"),
    _plain("NaN, infinity or out-of-range values of every numeric option", CLEAR,
           "test_every_numeric_option_refuses_out_of_range_values", "25"),
    _plain("a numeric config key without a range within its option's", CLEAR,
           "test_every_numeric_config_key_has_a_range_within_its_options", "25"),
    _plain("a 16-bit PNG of 12-bit grey", RIGHT,
           "test_16_bit_png_of_12_bit_grey_is_scaled_by_its_bit_depth", "rebuilt"),
    _plain("a predict sheet column typo", CLEAR,
           "test_a_predict_sheet_column_typo_is_refused", "rebuilt"),
    _plain("a panel asked of more genes than are ever detected", RIGHT,
           "test_never_detected_genes_do_not_fill_up_a_panel", "25"),
    _plain("a patch cache of another slide renamed", CLEAR,
           "test_a_patch_cache_of_another_slide_renamed_is_refused_naming_it", "25"),
]  # fmt: skip

#: cases asserted in their module's own test file
ELSEWHERE = [
    _plain("resume of another run's checkpoint", RIGHT,
           "test_train.py::test_checkpoint_of_another_run_is_not_resumed", "14"),
    _plain("killed training resumes to the same weights", RIGHT,
           "test_train.py::test_run_killed_after_an_epoch_resumes_to_the_same_weights", "14"),
    _plain("patch cache at another scale than the model's", CLEAR,
           "test_predict.py::test_patches_at_another_scale_are_refused_naming_both", "14"),
    _plain("weights with NaN values", CLEAR,
           "test_predict.py::test_corrupt_weights_give_an_error_and_no_file", "14"),
    _plain("unseeded predictive std", RIGHT,
           "test_predict.py::test_predictions_are_byte_identical_on_rerun", "14"),
    _plain("--epochs 0", CLEAR, "test_train.py::test_zero_epochs_is_an_error", "14"),
    _plain("--batch-size 0 (predict)", CLEAR,
           "test_predict.py::test_batch_size_zero_is_one_clear_line", "14"),
    _plain("--patch-px 0, a patch resolution out of range (tile)", CLEAR,
           "test_tiling.py::test_cli_reports_bad_input_naming_the_file", "14"),
    _plain("16-bit TIFF with 8-bit values, RGBA, grey", RIGHT,
           "test_slide.py::test_rgba_grey_and_16bit_images_are_converted", "14"),
    _plain("missing model / other panel", CLEAR,
           "test_predict.py::test_predict_refuses_a_missing_model_and_another_panel", "14"),
    _plain("unknown config keys, demo.generate with a custom sheet", CLEAR,
           "test_config.py::test_bad_config_is_one_line_naming_the_problem", "14"),
    _plain("bad sample sheet in the workflow", CLEAR,
           "test_workflow.py::test_bad_sample_sheet_stops_before_running", "14"),
    _plain("spots off the image, from another image", CLEAR,
           "test_tiling.py::test_slide_adata_from_another_image_is_refused", "14"),
    _plain("NaN spot coordinates", CLEAR, "test_tiling.py::test_nan_coordinates_are_refused",
           "14"),
    _plain("nonsense patch settings", CLEAR, "test_tiling.py::test_nonsense_patch_settings", "14"),
    _plain("unreadable slide level", CLEAR,
           "test_tiling.py::test_unreadable_level_is_reported_with_the_file", "14"),
    _plain("malformed fold files", CLEAR,
           "test_folds.py::test_read_fold_rejects_broken_or_leaky_files", "14"),
    _plain("a user's file at a hest-bench output (leaderboard.md)", CLEAR,
           "test_hest_bench.py::test_a_users_file_at_an_output_path_is_refused_before_any_work",
           "rebuilt"),
    _plain("create_model(latent_dim=0) in the Python API (was: the preset's size)", CLEAR,
           "test_models.py::test_create_model_refuses_latent_dim_zero_instead_of_using_the_presets",
           "rebuilt"),
]  # fmt: skip

CATALOGUE: list[Case] = [
    *_each("full disk", CLEAR, "test_full_disk_is_one_line_naming_the_output", "14", SUBCOMMANDS),
    *_each("read-only output folder", CLEAR, "test_read_only_folder_is_one_line_naming_it", "14",
           SUBCOMMANDS),
    *_each("--device cuda without a GPU", CLEAR, "test_cuda_without_a_gpu_is_one_line", "14",
           DEVICE_SUBCOMMANDS),
    *_each("a device name that is none", CLEAR, "test_bogus_device_name_is_one_line", "14",
           DEVICE_SUBCOMMANDS),
    *SAMPLE_SHEETS,
    *_each("a model applied to a fold normalised otherwise", CLEAR,
           "test_a_model_is_not_applied_to_a_fold_normalised_otherwise", "25",
           ("stevs", "ridge_color")),
    *_each("a model applied to its own training slides", CLEAR,
           "test_a_model_is_not_applied_to_its_own_training_slides", "25",
           ("stevs", "ridge_color")),
    *_each("export at or under a regular file", CLEAR,
           "test_export_at_or_under_a_regular_file_is_one_line", "25", ("at", "under")),
    *_each("a prediction of another slide", CLEAR,
           "test_a_prediction_of_another_slide_names_the_prediction", "25",
           ("recorded slide", "barcodes", "normalisation")),
    *NUMBERS,
    *_each("a 16-bit TIFF of 12-bit data", RIGHT,
           "test_16_bit_tiff_of_12_bit_data_is_scaled_by_its_bit_depth", "25",
           ("stripped", "tiled", "tiled-sampled", "max-tag")),
    *COLUMN_TYPOS,
    *_each("spots partly on glass", CLEAR, "test_spots_partly_on_glass_are_refused", "25",
           ("half-scale", "another-section")),
    *USER_FILES,
    *RERUNS,
    *SPACERANGER,
    *PLAIN,
    *ELSEWHERE,
]  # fmt: skip


def params(test: str) -> list[Any]:
    """The pytest parameters of a test of test_faults.py, from its cases here."""
    import pytest

    return [pytest.param(*c.params, id=c.id) for c in CATALOGUE if c.test == _faults(test)]


def counts() -> dict[str, int]:
    """Cases tried, and how many end in each outcome."""
    by_outcome = Counter(case.outcome for case in CATALOGUE)
    return {"tried": len(CATALOGUE), **{outcome: by_outcome[outcome] for outcome in OUTCOMES}}


def table() -> str:
    """The Markdown of docs/faults.md's counts and case list."""
    total = counts()
    by_source = Counter((case.source, case.outcome) for case in CATALOGUE)
    sources = sorted({case.source for case in CATALOGUE}, key=lambda s: (not s.isdigit(), s))
    lines = [
        f"{total['tried']} cases tried: {total[CLEAR]} clear errors, {total[RIGHT]} right, "
        "0 tracebacks, 0 silently wrong.",
        "",
        "| spelled out by | cases | clear error | right |",
        "|---|---|---|---|",
    ]
    for source in sources:
        clear, right = by_source[(source, CLEAR)], by_source[(source, RIGHT)]
        label = f"issue {source}" if source.isdigit() else source
        lines.append(f"| {label} | {clear + right} | {clear} | {right} |")
    lines += ["", "| case | outcome | source | test |", "|---|---|---|---|"]
    for case in CATALOGUE:
        fault = case.fault.replace("|", "\\|")
        lines.append(f"| {fault} | {case.outcome} | {case.source} | `{case.node}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
