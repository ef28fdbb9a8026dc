"""The conda environment names every dependency of pyproject.toml (correct by construction)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: PyPI name -> conda-forge package(s) providing it
CONDA_NAMES = {
    "torch": ["pytorch"],
    "snakemake": ["snakemake-minimal", "pygments"],  # [reports] extra = pygments
    "openslide-bin": ["openslide"],
    "matplotlib": ["matplotlib-base"],
}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_conda_env_covers_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = [_name(r) for r in project["dependencies"]]
    required += [_name(r) for r in project["optional-dependencies"]["pretrained"]]
    env = yaml.safe_load((ROOT / "envs" / "stevs.yaml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip_names = {_name(p) for p in pip}
    missing = [
        name
        for name in required
        if not all(c in conda for c in CONDA_NAMES.get(name, [name])) and name not in pip_names
    ]
    assert not missing, f"envs/stevs.yaml lacks {missing}"
    assert "-e .." in pip, "the checkout's stevs package must be installed into the env"
    unpinned = [d for d in env["dependencies"] if isinstance(d, str) and "=" not in d]
    assert unpinned == ["pip"], f"unpinned conda packages: {unpinned}"
    assert env["channels"][0] == "conda-forge"


def test_every_rule_uses_the_env():
    for rules in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, flags=re.M))
        assert text.count('conda:\n        "../../envs/stevs.yaml"') == n_rules, rules.name
