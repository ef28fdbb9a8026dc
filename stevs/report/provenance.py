"""The report's provenance: package versions, git commits, the fold protocol in words and
the config the run used, verbatim."""

from __future__ import annotations

import html
import logging
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from stevs.errors import StevsInputError

log = logging.getLogger(__name__)

#: the stevs package's folder, whose git checkout the page names
STEVS_SOURCE = Path(__file__).resolve().parents[1]

#: the fold file's ``validation`` mode in words
VALIDATION_WORDS = {
    "slide": "validation carved out of the training data as whole training slides, "
    "never the test fold",
    "patient": "validation carved out of the training data as whole training patients, "
    "never the test fold",
    "blocks": "validation carved out of the training data as spatial blocks of training "
    "slides (buffered from held-out spots), never the test fold",
}
VERSION_PACKAGES = ["stevs", "torch", "timm", "numpy", "scipy", "scikit-learn", "anndata", "pandas"]


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    versions = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit(cwd: str | os.PathLike = ".") -> str:
    """``<sha>`` (plus `` (uncommitted changes)``) of the git checkout at ``cwd``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{sha} (uncommitted changes)" if dirty else sha


def describe_fold(data: dict[str, Any]) -> str:
    """One fold file in words: scheme, seed, slides, how validation was chosen, the panel."""
    name = data.get("fold", "?")
    scheme = data.get("scheme", "unknown scheme")
    parts = [
        f"<b>{html.escape(str(name))}</b>: {html.escape(str(scheme))}, seed {data.get('seed')}"
    ]

    def slides(key: str) -> str:
        ids = [str(s) for s in data.get(key, [])]
        return f"{len(ids)} ({html.escape(', '.join(ids[:8]))}{', ...' if len(ids) > 8 else ''})"

    parts.append(
        f"train slides {slides('train')}; validation {slides('val')}; test {slides('test')}"
    )
    if data.get("spots"):
        counts = {k: sum(len(v) for v in d.values()) for k, d in data["spots"].items()}
        parts.append(
            "within-slice: spots split into spatial blocks, "
            + ", ".join(f"{k} {v} spots" for k, v in counts.items())
        )
    validation = data.get("validation")
    has_val = bool(data.get("val") or (data.get("spots") or {}).get("val"))
    if not has_val:
        parts.append("no validation set")
    elif validation in VALIDATION_WORDS:
        parts.append(VALIDATION_WORDS[validation])
    else:
        parts.append("validation carved out of the training data, never the test fold")
    if data.get("shared_patients"):
        shared = ", ".join(map(str, data["shared_patients"]))
        parts.append(f"<b>test patients also seen in training: {html.escape(shared)}</b>")
    panel = data.get("panel") or {}
    genes = data.get("genes", [])
    headline = data.get("headline_genes", [])
    panel_words = f"panel of {len(genes)} genes"
    if panel.get("method"):
        panel_words += f" ({html.escape(str(panel['method']))})"
    dropped = panel.get("dropped")
    if isinstance(dropped, dict) and any(dropped.values()):
        panel_words += ", dropped: " + html.escape(
            ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        )
    parts.append(
        f"{panel_words}, chosen on training spots only; {len(headline)} headline genes "
        "(the most variable training genes)"
    )
    norm = data.get("normalisation") or {}
    parts.append(
        f"targets normalised {html.escape(str(norm.get('method', 'log1p_cp10k')))}"
        f" (target sum {norm.get('target_sum', 1e4):g})"
    )
    return "; ".join(parts) + "."


def provenance_html(
    fold_data: dict[str, dict[str, Any]], config_path: str | os.PathLike | None
) -> str:
    """Versions, git commit, seeds, fold protocol in words and the config file verbatim.

    ``config_path`` is the config the run used: in the workflow, ``{results}/config.yaml``,
    the merged config Snakemake ran with (every ``--configfile``, ``--config`` overrides and
    the schema's defaults). Its seeds are every key named ``seed`` at any depth
    (``training.seed``, ``folds.seed``, ``demo.seed``).
    """
    versions = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in package_versions().items()
    )
    seeds = sorted({str(d.get("seed")) for d in fold_data.values()})
    config_text, config_seeds, config_name = "(no config file given)", "n/a", ""
    if config_path is not None:
        path = Path(config_path)
        if not path.exists():
            raise StevsInputError(path, "config file not found")
        config_text = path.read_text()
        try:
            import yaml

            parsed = yaml.safe_load(config_text)
        except Exception as err:  # yaml errors: the report shows the text anyway
            log.warning("%s: config not parsed (%s)", path, err)
            parsed = None
        found = _config_seeds(parsed)
        config_seeds = ", ".join(f"{k} {v}" for k, v in found) if found else "none set"
        config_name = html.escape(str(path))
    protocol = "".join(f"<li>{describe_fold(d)}</li>" for d in fold_data.values())
    return (
        "<h2>Provenance</h2><table id='versions'><tr><th>package</th><th>version</th></tr>"
        f"{versions}</table>"
        f"<p>git commit: <code>{html.escape(git_commit())}</code> (working directory); "
        f"stevs source: <code>{html.escape(git_commit(STEVS_SOURCE))}</code><br>"
        f"seeds (config): <code>{html.escape(config_seeds)}</code>; fold seeds: "
        f"<code>{html.escape(', '.join(seeds) or 'n/a')}</code></p>"
        "<h3>Fold protocol</h3>"
        + (f"<ul>{protocol}</ul>" if protocol else "<p>No fold files given.</p>")
        + "<h3>Config</h3>"
        + (
            f"<p>The config this run used (<code>{config_name}</code>):</p>"
            if config_path is not None
            else ""
        )
        + f"<pre id='config'>{html.escape(config_text)}</pre>"
    )


def _config_seeds(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every ``seed`` (or ``seeds`` list) key of a parsed config, at any depth, as (dotted
    key, value)."""
    if not isinstance(config, dict):
        return []
    found: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key == "seed" and not isinstance(value, dict | list):
            found.append((name, value))
        elif key == "seeds" and isinstance(value, list):
            found.append((name, ",".join(map(str, value))))
        elif isinstance(value, dict):
            found += _config_seeds(value, f"{name}.")
    return found
