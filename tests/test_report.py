"""Tests of stevs.report: the report builds from small fixture predictions, is self-contained,
its method-by-metric table equals summary.tsv, and the baselines are the method registry's."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from stevs import methods, metrics, report
from stevs.cli import main
from stevs.errors import StevsInputError
from stevs.io.prediction import read_background
from stevs.report import figures, page, tables

GENES = [f"g{i}" for i in range(8)]
N_SPOTS = 40


class TableCells(HTMLParser):
    """Collects the ``data-*`` attributes and text of the summary table's cells."""

    def __init__(self) -> None:
        super().__init__()
        self.in_summary = False
        self.method: str | None = None
        self.cells: list[dict] = []
        self.current: dict | None = None
        self.images: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in {"script", "link"} or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)
        if tag == "table":
            self.in_summary = attrs.get("id") == "summary"
        if self.in_summary and tag == "tr":
            self.method = attrs.get("data-method")
        if self.in_summary and tag == "td" and "data-metric" in attrs:
            self.current = {"method": self.method, **attrs, "text": ""}

    def handle_data(self, data: str) -> None:
        if self.current is not None:
            self.current["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.current is not None:
            self.cells.append(self.current)
            self.current = None
        if tag == "table":
            self.in_summary = False


def make_run(root: Path) -> dict[str, Path]:
    """Slides, 2 folds, predictions of 2 methods, their metrics and one training log."""
    rng = np.random.default_rng(0)
    slides = {}
    truth = {}
    for slide in ("A", "B", "C"):
        counts = rng.poisson(
            rng.gamma(2.0, 10.0, size=(1, len(GENES) + 1)), (N_SPOTS, len(GENES) + 1)
        )
        counts[:, 7] = 0  # g7 constant (never expressed)
        barcodes = [f"{slide}-{i}" for i in range(N_SPOTS)]
        adata = ad.AnnData(
            X=sparse.csr_matrix(counts.astype(np.float32)),
            obs=pd.DataFrame(index=barcodes),
            var=pd.DataFrame(index=[*GENES, "other"]),
        )
        grid = np.indices((5, 8)).reshape(2, -1).T * 100.0
        adata.obsm["spatial"] = grid
        path = root / "slides" / f"{slide}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
        slides[slide] = path
        truth[slide] = metrics.normalise_counts(counts, [*GENES, "other"], GENES)
    folds_dir = root / "folds"
    folds_dir.mkdir()
    for k, test in enumerate(("A", "B")):
        fold = {
            "fold": f"fold{k}",
            "scheme": "leave_one_slide_out",
            "seed": 7,
            "train": [s for s in slides if s != test and s != "C"],
            "val": ["C"],
            "test": [test],
            "genes": GENES,
            "headline_genes": GENES[:4],
            "panel": {"method": "highly_variable", "n": len(GENES), "dropped": {"ribosomal": 1}},
            "normalisation": {
                "method": "log1p_cp10k",
                "target_sum": 10000,
                "mean": [0.0] * len(GENES),
                "std": [1.0] * len(GENES),
            },
            "validation": "slide",
            "slides": [
                {"slide": s, "patient": s, "adata": str(p), "patches": str(p) + ".h5"}
                for s, p in slides.items()
            ],
        }
        (folds_dir / f"fold{k}.json").write_text(json.dumps(fold))
        for method, noise in (("good", 0.3), ("poor", 3.0)):
            obs = truth[test]
            pred = obs + rng.normal(scale=noise, size=obs.shape)
            out = ad.AnnData(
                X=pred.astype(np.float32),
                obs=pd.DataFrame(index=[f"{test}-{i}" for i in range(N_SPOTS)]),
                var=pd.DataFrame(index=GENES),
            )
            out.layers["std"] = np.full(pred.shape, noise, dtype=np.float32)
            out.obsm["spatial"] = np.indices((5, 8)).reshape(2, -1).T * 100.0
            pred_dir = root / "predictions" / method / f"fold{k}"
            pred_dir.mkdir(parents=True, exist_ok=True)
            out.write_h5ad(pred_dir / f"{test}.h5ad")
            per_gene, summary, pooled = metrics.evaluate_fold(
                folds_dir / f"fold{k}.json", pred_dir, method
            )
            metrics.write_evaluation(
                per_gene, summary, pooled, root / "metrics" / method / f"fold{k}.tsv"
            )
    log_dir = root / "models" / "good" / "fold0"
    log_dir.mkdir(parents=True)
    pd.DataFrame(
        {
            "epoch": range(5),
            "val_pearson_r_mean_headline": np.linspace(0.1, 0.6, 5),
            "train_loss": np.linspace(3, 1, 5),
        }
    ).to_csv(log_dir / "metrics.csv", index=False)
    config = root / "config.yaml"
    config.write_text("seed: 7\nmethods: [good, poor]\n# marker-in-config\n")
    return {
        "metrics": root / "metrics",
        "predictions": root / "predictions",
        "folds": folds_dir,
        "models": root / "models",
        "config": config,
        "out": root / "report",
    }


@pytest.fixture(scope="module")
def built_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = make_run(tmp_path_factory.mktemp("run"))
    argv = ["report"]
    for key in ("metrics", "predictions", "folds", "models", "config", "out"):
        argv += [f"--{key}", str(paths[key])]
    assert main(argv) == 0
    return paths


def test_report_files_exist_and_html_is_self_contained(built_report: dict[str, Path]) -> None:
    out = built_report["out"]
    assert {"index.html", "summary.tsv", "per_gene.tsv", "folds.tsv", "pooled.tsv"} <= {
        p.name for p in out.iterdir()
    }
    text = (out / "index.html").read_text()
    parser = TableCells()
    parser.feed(text)
    assert parser.external == []  # no scripts, stylesheets or linked images
    # 10 bar charts + per-gene r + 2 spatial maps (one test slide per fold) + 1 training curve
    assert len(parser.images) == len(report.TABLE_METRICS) + 1 + 2 + 1
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "How to read this" in text and "optimistic" in text and "pooled" in text
    assert "marker-in-config" in text  # config copied verbatim
    assert "leave_one_slide_out, seed 7" in text  # fold protocol in words
    assert "validation carved out of the training data as whole training slides" in text
    assert "panel of 8 genes (highly_variable), dropped: ribosomal 1" in text
    assert re.search(r"git commit: <code>([0-9a-f]{40}|not a git checkout)", text)
    assert "torch" in text and "timm" in text


def test_html_table_matches_summary_tsv(built_report: dict[str, Path]) -> None:
    out = built_report["out"]
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("method")
    parser = TableCells()
    parser.feed((out / "index.html").read_text())
    assert len(parser.cells) == 2 * len(report.TABLE_METRICS)
    for cell in parser.cells:
        mean = summary.loc[cell["method"], f"{cell['data-metric']}_mean"]
        std = summary.loc[cell["method"], f"{cell['data-metric']}_std"]
        assert float(cell["data-mean"]) == pytest.approx(mean, rel=1e-9)
        assert float(cell["data-std"]) == pytest.approx(std, rel=1e-9)
        shown_mean, shown_std = (float(v) for v in cell["text"].split(" ± "))
        assert shown_mean == pytest.approx(mean, abs=5e-4)
        assert shown_std == pytest.approx(std, abs=5e-4)


def test_summary_tsv_is_mean_and_std_over_fold_summaries(built_report: dict[str, Path]) -> None:
    out = built_report["out"]
    summary = pd.read_csv(out / "summary.tsv", sep="\t").set_index("method")
    folds = pd.concat(
        pd.read_csv(p, sep="\t") for p in sorted(built_report["metrics"].glob("*/*.summary.tsv"))
    )
    for method, group in folds.groupby("method"):
        for metric in report.TABLE_METRICS:
            assert summary.loc[method, f"{metric}_mean"] == pytest.approx(group[metric].mean())
            assert summary.loc[method, f"{metric}_std"] == pytest.approx(group[metric].std(ddof=1))
        assert summary.loc[method, "n_folds"] == 2
        assert summary.loc[method, "n_constant_total"] == 2  # g7 on one test slide per fold
    assert (
        summary.loc["good", "pearson_r_mean_headline_mean"]
        > summary.loc["poor", "pearson_r_mean_headline_mean"]
    )
    per_gene = pd.read_csv(out / "per_gene.tsv", sep="\t")
    assert len(per_gene) == 2 * 2 * len(GENES)
    assert per_gene.columns.tolist() == [*metrics.PER_GENE_COLUMNS, "encoder", "seed", "run"]


def test_report_without_optional_inputs_and_bad_input(tmp_path: Path, built_report) -> None:
    index = report.build_report(built_report["metrics"], tmp_path / "r")
    text = index.read_text()
    assert 'id="summary"' in text and "No fold files given" in text
    assert "Spatial maps" not in text
    with pytest.raises(StevsInputError, match="no .*summary.tsv files found"):
        report.build_report(tmp_path / "empty", tmp_path / "r2")
    with pytest.raises(StevsInputError, match="config file not found"):
        report.build_report(
            built_report["metrics"], tmp_path / "r3", config_path=tmp_path / "x.yaml"
        )


def test_wide_tables_scroll_inside_the_page() -> None:
    rule = re.search(r"(?m)^table \{([^}]*)\}", page.CSS).group(1)
    assert "overflow-x: auto" in rule and "display: block" in rule and "max-width: 100%" in rule


def test_spot_map_draws_over_the_he_with_a_colour_bar(tmp_path: Path) -> None:
    plt = figures._pyplot()
    image = np.zeros((60, 80, 3), np.uint8)
    image[..., 0] = 200
    adata = ad.AnnData(np.zeros((3, 1), np.float32))
    adata.uns["spatial"] = {
        "s": {"images": {"lowres": image}, "scalefactors": {"tissue_lowres_scalef": 0.1}}
    }
    adata.write_h5ad(tmp_path / "p.h5ad")
    background = read_background(tmp_path / "p.h5ad")
    assert background.image.shape == (60, 80, 3) and background.scalef == 0.1
    xy = np.array([[100.0, 100.0], [300.0, 200.0], [500.0, 400.0]])
    fig, ax = plt.subplots()
    figures.draw_spot_map(ax, xy, np.array([0.0, 1.0, 2.0]), background, dot=5)
    assert len(ax.images) == 1  # the H&E underneath
    assert ax.images[0].get_extent() == [0, 800.0, 600.0, 0]  # image px -> level-0 px
    assert len(fig.axes) == 2  # the colour bar's own axes
    x0, x1 = ax.get_xlim()
    assert x0 < 100 and x1 > 500 and x1 < 800  # cropped to the spots
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # image orientation: y down
    plt.close(fig)
    assert read_background(_write_plain(tmp_path)) is None


def _write_plain(tmp_path: Path) -> Path:
    ad.AnnData(np.zeros((2, 1), np.float32)).write_h5ad(tmp_path / "plain.h5ad")
    return tmp_path / "plain.h5ad"


def test_baselines_are_the_registry_s() -> None:
    """The comparison's candidates are what the method registry calls baselines: one that needs
    no encoder also under the encoder id ``none``, the others only on the same encoder; a method
    the registry does not know, or does not call a baseline, never."""
    available = {
        ("enc", "stevs"), ("enc", "stevs_concat"), ("enc", "ridge_embed"),
        ("other", "ridge_embed"), ("other", "stnet"), ("none", "ridge_color"), ("enc", "good"),
    }  # fmt: skip
    assert tables.baseline_candidates("enc", available) == [
        ("enc", "ridge_embed"),
        ("none", "ridge_color"),
    ]
    assert tables.baseline_candidates("", {("", "ridge_color"), ("", "stnet")}) == [
        ("", "stnet"),
        ("", "ridge_color"),
    ]


def test_a_new_registry_baseline_is_compared_without_touching_the_report(monkeypatch) -> None:
    extra = {
        "probe": methods.Method("probe", "ridge", "a probe", baseline=True, encoder="frozen"),
        "floor": methods.Method("floor", "ridge", "a floor", baseline=True, encoder="none"),
    }
    monkeypatch.setattr(methods, "REGISTRY", {**methods.REGISTRY, **extra})
    available = {("enc", "stevs"), ("enc", "probe"), ("none", "floor"), ("none", "probe")}
    assert tables.baseline_candidates("enc", available) == [("enc", "probe"), ("none", "floor")]


def test_first_screen_answers_before_the_reading_guide(built_report: dict[str, Path]) -> None:
    """The verdict line and the leaderboard open the page; the reading guide comes after
    every table and figure; the comparison table shows its verdict and test first."""
    text = (built_report["out"] / "index.html").read_text()
    verdict = text.index("<section id=verdict>")
    assert verdict < text.index('id="leaderboard"') < text.index('id="summary"')
    assert text.index('id="summary"') < text.index("<h2 id=how>How to read this")
    assert "Without an encoder: good leads with headline r" in text
    assert "too few slides to test whether this is more than the noise (2 held-out" in text
    assert re.search(r"<tr class=group><th colspan=\d+>no image encoder</th></tr>", text)
    assert page.COMPARISON_COLUMNS[3:6] == ["difference", "verdict", "slide_wilcoxon_p"]


def _figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Figures the report would encode, kept open for inspection."""
    kept: list = []
    monkeypatch.setattr(figures, "_png", lambda fig: kept.append(fig) or "png")
    return kept


def test_bars_and_boxes_are_one_per_encoder_and_method(monkeypatch) -> None:
    """Two encoders with the same method names: a bar (its own value and error bar) and a
    box each, never one bar per method name."""
    kept = _figures(monkeypatch)
    summary = pd.DataFrame({
        "encoder": ["a", "a", "b", "b", "none"], "method": ["stevs", "stnet"] * 2 + ["ridge"],
        **{f"{m}_mean": [0.1, 0.2, 0.3, 0.4, 0.05] for m in report.TABLE_METRICS},
        **{f"{m}_std": [0.01, 0.02, 0.03, 0.04, 0.0] for m in report.TABLE_METRICS},
    })  # fmt: skip
    figures.bar_charts(summary)
    ax = kept[0].axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.05])
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["stevs\na", "stnet\na"]
    bars = next(c for c in ax.containers if hasattr(c, "errorbar"))
    segments = bars.errorbar.lines[2][0].get_segments()  # each bar its own std
    assert [s[1, 1] - s[0, 1] for s in segments] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0])
    per_gene = pd.DataFrame({
        "encoder": ["a", "b", "a", "b"] * 5, "method": ["stevs"] * 20,
        "pearson_r": np.r_[[0.1, 0.9] * 5, [0.2, 0.8] * 5],
    })  # fmt: skip
    figures.gene_r_distribution(per_gene)
    box_ax = kept[-1].axes[0]
    assert [t.get_text() for t in box_ax.get_xticklabels()] == ["stevs\na", "stevs\nb"]
    quartiles = [(b.get_path().get_extents().y0, b.get_path().get_extents().y1)
                 for b in box_ax.patches]  # fmt: skip
    assert quartiles == [pytest.approx((0.1, 0.2)), pytest.approx((0.8, 0.9))]


def test_ridge_logs_get_no_training_curve(tmp_path: Path, monkeypatch) -> None:
    kept = _figures(monkeypatch)
    ridge = tmp_path / "none" / "ridge_color" / "seed0" / "fold0"
    ridge.mkdir(parents=True)
    pd.DataFrame({"alpha": [1.0, 10.0], "cv_r": [0.3, 0.4]}).to_csv(ridge / "metrics.csv")
    deep = tmp_path / "a" / "stevs" / "seed0" / "fold0"
    deep.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 1], "val_pearson_r_mean_headline": [0.1, 0.2],
                  "train_loss": [2.0, 1.0]}).to_csv(deep / "metrics.csv")  # fmt: skip
    curves = figures.training_curves(tmp_path, ["none/ridge_color/seed0", "a/stevs/seed0"])
    assert list(curves) == ["a/stevs/seed0"]
    assert all(ax.lines for ax in kept[0].axes)  # no empty panel


def test_maps_share_one_scale_per_gene_and_titles_fit(monkeypatch) -> None:
    kept = _figures(monkeypatch)
    rng = np.random.default_rng(0)
    xy = np.indices((10, 10)).reshape(2, -1).T * 100.0
    row = [("GENE_1: observed", rng.normal(5, 1, 100))]
    row += [
        (f"{figures.run_title(r)}\nGENE_1: r = 0.91", rng.normal(4, 0.2, 100))
        for r in ("effnet_lite0_in1k-frozen/stevs/seed0", "none/ridge_color/seed0")
    ]
    figures.map_figure([row, row], xy, None)
    fig = kept[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    maps = [ax for ax in fig.axes if ax.get_title()]  # the colour bars have none
    assert len(maps) == 6
    for ax in maps:
        assert ax.get_window_extent().width >= 200  # px at the report's dpi: readable
        assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent().width * 1.1
    limits = {ax.collections[0].get_clim() for ax in maps[:3]}
    assert len(limits) == 1  # observed and predicted on one colour scale
    assert len(fig.axes) == 6 + 2  # one colour bar per gene row
