"""The pinned versions and the conda environment are generated from pyproject.toml
(envs/generate.py) and are what the test suite runs with."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
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
    # nothing that depends on where the file lies: Snakemake copies it to .snakemake/conda/
    assert not [p for p in pip if p.startswith(("-e", ".", "/"))], pip
    covered = set(channels) | {generate.package_name(p) for p in pip}
    for name in generate.requirements(generate.ENV_EXTRAS):
        names = [c.split("::")[1] for c in generate.CONDA.get(name, [f"conda-forge::{name}"])]
        assert all(n in covered for n in names) or name in covered, f"envs/stevs.yaml lacks {name}"


def test_every_rule_uses_the_env():
    for rules in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = len(re.findall(r"^rule \w+:", text, flags=re.M))
        assert text.count('conda:\n        "../../envs/stevs.yaml"') == n_rules, rules.name


def _run_post_deploy(tmp_path: Path, source: str | None) -> subprocess.CompletedProcess:
    """The post-deploy script as Snakemake runs it: copied to .snakemake/conda/<hash>.post-
    deploy.sh, run from the working directory with the env's `python` first on PATH (here a
    stub that records its arguments)."""
    from snakemake.sourcecache import LocalSourceFile

    found = LocalSourceFile(str(ROOT / "envs" / "stevs.yaml")).replace_suffix(
        [".yaml", ".yml"], ".post-deploy.sh"
    )  # where Snakemake looks for it
    script = Path(found.get_path_or_uri(secret_free=True))
    assert script.is_file(), script
    copy = tmp_path / "work" / ".snakemake" / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(script, copy)
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/python.args\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "STEVS_SOURCE"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if source is not None:
        env["STEVS_SOURCE"] = source
    return subprocess.run(
        ["bash", str(copy)], cwd=copy.parents[2], env=env, capture_output=True, text=True
    )


def test_post_deploy_installs_the_checkout_from_a_copy_of_the_script(tmp_path):
    result = _run_post_deploy(tmp_path, str(ROOT))
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "python.args").read_text().split()
    assert args == ["-m", "pip", "install", "--no-deps", "--editable", str(ROOT)]


@pytest.mark.parametrize(
    ("source", "message"),
    [(None, "STEVS_SOURCE is not set"), ("/nonexistent", "holds no pyproject.toml")],
)
def test_post_deploy_without_the_checkout_fails_naming_it(tmp_path, source, message):
    result = _run_post_deploy(tmp_path, source)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "python.args").exists()
