"""The report opened in a real browser (headless Chromium), as a reader sees it.

:func:`browser_check` loads a copy of ``index.html`` with a small script appended (the
report itself carries no script), at a window of ``width`` x ``height`` CSS px, and reads
back from the page: whether the verdict lines and the leaderboard lie in the first screen,
whether every table's verdict and p-value columns are on screen without scrolling,
whether every ``<img>`` loaded (``naturalWidth > 0``), and which figures are empty plots
(a half of the picture without any coloured pixel: bars, boxes' medians, curves, maps and
the H&E are coloured; empty axes are black on white). :func:`screenshot` writes a PNG of
the first screen. Both need Debian's ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from stevs.errors import StevsInputError

#: a page's first screen, in CSS px: a laptop browser window
FIRST_SCREEN = (1400, 900)
#: the share of a figure half's pixels that must be coloured for it to count as drawn
MIN_COLOURED = 0.002

#: runs in the page after load; its JSON lands in <pre id="browser-check">
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const out = {width: window.innerWidth, height: window.innerHeight, images: []};
  const box = (id) => {
    const el = document.getElementById(id);
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, right: r.right, text: el.innerText};
  };
  out.verdict = box("verdict");
  out.leaderboard = box("leaderboard");
  out.columns = [];  // where each table's verdict and p-value headers sit
  for (const th of document.querySelectorAll("th")) {
    const name = th.innerText.trim();
    if (["verdict", "slide_wilcoxon_p", "p (slides)"].includes(name)) {
      const table = th.closest("table").getBoundingClientRect();
      out.columns.push({name: name, table: th.closest("table").id,
                        right: th.getBoundingClientRect().right, visible: table.right});
    }
  }
  for (const img of document.images) {
    const row = {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
                 coloured: []};
    if (img.naturalWidth > 0) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const half = Math.floor(canvas.width / 2);
      const counts = [0, 0], totals = [0, 0];
      for (let i = 0; i < data.length; i += 4) {
        const x = (i / 4) % canvas.width, side = x < half ? 0 : 1;
        const hi = Math.max(data[i], data[i + 1], data[i + 2]);
        const lo = Math.min(data[i], data[i + 1], data[i + 2]);
        totals[side] += 1;
        if (hi - lo > 60) counts[side] += 1;
      }
      row.coloured = counts.map((c, k) => c / Math.max(totals[k], 1));
    }
    out.images.push(row);
  }
  const pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium() -> str | None:
    """The ``chromium`` (or ``chromium-browser``, ``google-chrome``) on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], profile: str) -> str:
    """Run headless Chromium with a throwaway profile; its stdout."""
    browser = find_chromium()
    if browser is None:
        raise StevsInputError("chromium", "no chromium on PATH (apt-get install chromium)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise StevsInputError(args[-1], f"chromium failed: {tail[0]}")
    return result.stdout


def screenshot(index: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A PNG of the page's first screen (:data:`FIRST_SCREEN`) at ``out``."""
    width, height = FIRST_SCREEN
    with tempfile.TemporaryDirectory() as profile:
        _run([f"--window-size={width},{height}", f"--screenshot={Path(out).resolve()}",
              Path(index).resolve().as_uri()], profile)  # fmt: skip
    return Path(out)


def browser_check(index: str | os.PathLike) -> dict[str, Any]:
    """What the page shows in headless Chromium (see the module's docstring): the raw
    measurements and ``problems``, one line each (empty: the page passes)."""
    width, height = FIRST_SCREEN
    text = Path(index).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "index.html"
        page.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
        dom = _run([f"--window-size={width},{height}", "--dump-dom", page.as_uri()],
                   str(Path(tmp) / "profile"))  # fmt: skip
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.DOTALL)
    if not found:
        raise StevsInputError(index, "the page's check did not run in chromium")
    import html

    result = json.loads(html.unescape(found.group(1)))
    result["problems"] = page_problems(result)
    return result


def page_problems(result: dict[str, Any]) -> list[str]:
    """The problems in :func:`browser_check`'s measurements, one line each."""
    problems = []
    for name in ("verdict", "leaderboard"):
        box = result.get(name)
        if box is None:
            problems.append(f"no #{name} on the page")
        elif box["top"] < 0 or box["bottom"] > result["height"] or box["right"] > result["width"]:
            problems.append(f"#{name} is not inside the first screen: {box}")
    for column in result.get("columns", []):
        if column["right"] > min(column["visible"], result["width"]) + 1:
            problems.append(f"the {column['name']} column of #{column['table']} is off screen")
    for index, image in enumerate(result["images"]):
        name = f"image {index} ({image['alt']})"
        if not image["complete"] or image["naturalWidth"] <= 0:
            problems.append(f"{name} did not load")
        elif min(image["coloured"]) < MIN_COLOURED:
            problems.append(f"{name} is an empty plot (coloured share {image['coloured']})")
    return problems
