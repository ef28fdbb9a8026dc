"""The pinned versions and the conda environment are generated from pyproject.toml
(envs/generate.py) and are what the test suite runs with."""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("generate_env", ROOT / "envs" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


def test_env_file_is_what_the_generator_writes():
    assert generate.main(["--check"]) == 0, "run python envs/generate.py"


def test_versions_pin_every_dependency_and_are_installed():
    pinned = generate.read_versions()
    for name in generate.requirements():
        assert name in pinned, f"envs/versions.txt lacks {name}: python envs/generate.py --freeze"
        installed = metadata.version(name)
        assert installed == pinned[name], (
            f"{name} {installed} installed, envs/versions.txt pins {pinned[name]}: "
            "make install (pip -c envs/versions.txt) or python envs/generate.py --freeze"
        )


def test_conda_env_names_channels_and_pins():
    env = yaml.safe_load((ROOT / "envs" / "stevs.yaml").read_text())
    assert env["channels"] == ["conda-forge", "bioconda", "nodefaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    channels = {d.split("::")[1].split()[0]: d.split("::")[0] for d in conda}
    assert channels["snakemake-minimal"] == "bioconda"
    assert channels["snakemake-executor-plugin-slurm"] == "bioconda"
    assert channels["pytorch"] == "conda-forge" and "torch" not in channels
    assert all(c in env["channels"] for c in channels.values())
    pinned = generate.read_versions()
    for line in conda:
        name = line.split("::")[1].split()[0]
        assert name == "pip" or re.search(r" =\d+\.\d+$", line), f"unpinned: {line}"
    torch_pin = next(d for d in conda if "::pytorch " in d).split("=")[1]
    assert pinned["torch"].startswith(torch_pin + ".")  # the version the tests ran with
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e .." in pip, "the checkout's stevs package must be installed into the env"
    covered = set(channels) | {generate.package_name(p) for p in pip}
    for name in generate.requirements(generate.ENV_EXTRAS):
        names = [c.split("::")[1] for c in generate.CONDA.get(name, [f"conda-forge::{name}"])]
        assert all(n in covered for n in names) or name in covered, f"envs/stevs.yaml lacks {name}"


def test_every_rule_uses_the_env():
    for rules in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, flags=re.M))
        assert text.count('conda:\n        "../../envs/stevs.yaml"') == n_rules, rules.name
