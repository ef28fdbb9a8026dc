"""The report in a real browser (Debian's headless ``chromium``): the verdict line and the
ranked table fill the first screen at 1400 px, every picture loads and none is an empty plot.

Skipped only where chromium is missing and ``.ci/run`` installs it, so CI always runs it."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import make_run

from stevs.cli import main
from stevs.report import browser

ROOT = Path(__file__).resolve().parents[1]


def _need_chromium() -> None:
    if browser.find_chromium() is None:
        installs = "apt-get install -y chromium" in (ROOT / ".ci" / "run").read_text()
        if not installs:
            pytest.fail("no chromium here and .ci/run does not install it")
        pytest.skip("no chromium on PATH (.ci/run installs it for CI)")


@pytest.fixture(scope="module")
def report_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need_chromium()
    paths = make_run(tmp_path_factory.mktemp("run"))
    argv = ["report"]
    for key in ("metrics", "predictions", "folds", "models", "config", "out"):
        argv += [f"--{key}", str(paths[key])]
    assert main(argv) == 0
    return paths["out"] / "index.html"


def test_report_first_screen_in_chromium(report_index: Path, tmp_path: Path) -> None:
    result = browser.browser_check(report_index)
    assert result["problems"] == []
    # the window's inner size: its width, its height less what the headless window keeps
    assert result["width"] == browser.FIRST_SCREEN[0] and result["height"] >= 700
    assert "good leads with headline r" in result["verdict"]["text"]
    assert result["leaderboard"]["bottom"] <= result["height"]
    assert len(result["images"]) >= 10 and all(i["naturalWidth"] > 0 for i in result["images"])
    shot = browser.screenshot(report_index, tmp_path / "first.png")
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[1] == browser.FIRST_SCREEN[0]
    assert (picture.std(axis=(0, 1)) > 10).all()  # drawn, not a blank page


def _png(draw: bool) -> str:
    from stevs.report.figures import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    if draw:
        ax.bar([0, 1], [0.3, 0.5], color=["C0", "C1"])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def test_browser_check_catches_what_a_reader_would(tmp_path: Path) -> None:
    """A verdict below the first screen, a picture that does not load, empty axes and a
    verdict column scrolled off are each reported; a drawn figure is not."""
    _need_chromium()
    page = tmp_path / "index.html"
    page.write_text(
        "<!DOCTYPE html><html><body><div style='height:2000px'></div>"
        "<section id=verdict><p>late</p></section><table id=leaderboard><tr><td>x</td></tr>"
        f"</table><img alt=drawn src='data:image/png;base64,{_png(True)}'>"
        f"<img alt=empty src='data:image/png;base64,{_png(False)}'>"
        "<img alt=broken src='data:image/png;base64,AAAA'>"
        "<table id=wide style='display:block;overflow-x:auto;max-width:600px'><tr>"
        "<th style='min-width:2000px'>a</th><th>verdict</th></tr></table></body></html>"
    )
    problems = browser.browser_check(page)["problems"]
    assert any(p.startswith("#verdict is not inside the first screen") for p in problems)
    assert any("(empty) is an empty plot" in p for p in problems)
    assert any("(broken) did not load" in p for p in problems)
    assert "the verdict column of #wide is off screen" in problems
    assert not any("(drawn)" in p for p in problems)
