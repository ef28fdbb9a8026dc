"""What users read besides the report: every command's help, the Snakemake report's captions,
and the README's facts (paths, the demo's methods) checked against the workflow itself."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
import yaml

from stevs.cli import COMMANDS, STAGES, command_parser, main

ROOT = Path(__file__).resolve().parents[1]
RANGE = re.compile(r"\s*\[[^\]]*\]$")  # the numeric range stevs.options appends


def _options() -> list[tuple[str, argparse.Action, argparse.ArgumentParser]]:
    every = []
    for command in COMMANDS:
        _, parser = command_parser(command)
        required_groups = [g for g in parser._mutually_exclusive_groups if g.required]
        exclusive = {id(a) for g in required_groups for a in g._group_actions}
        every += [
            (command, action, parser)
            for action in parser._actions
            if not isinstance(action, argparse._HelpAction) and id(action) not in exclusive
        ]
    return every


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    for command, action, parser in _options():
        name = f"stevs {command} {'/'.join(action.option_strings) or action.dest}"
        assert RANGE.sub("", action.help or "").strip(), f"{name}: no help text"
        if action.required or isinstance(action, argparse._StoreTrueAction):
            continue
        shown = " ".join(parser.format_help().split())
        if "default" in action.help.lower():
            continue  # the help says what the default is, in its own words
        assert action.default is not None, f"{name}: says nothing of its default"
        assert f"(default: {action.default})" in shown, f"{name}: default not shown"


def test_help_paths_follow_the_workflow_layout() -> None:
    """No help text names the old {method}/{fold} or METHOD/FOLD layout."""
    for command, action, _ in _options():
        text = action.help or ""
        assert "METHOD/FOLD" not in text and "FOLD.json" not in text, (command, text)
        if "{method}" in text:
            assert "{encoder}/{method}/seed{seed}" in text, (command, text)


def test_top_help_names_the_stages_in_order_and_the_workflow(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "snakemake --cores" in text and "results/report/index.html" in text
    assert " -> ".join(STAGES) in text
    listed = re.findall(r"(?m)^  ([a-z][a-z-]*) {2,}", text)
    assert listed[: len(STAGES)] == STAGES and sorted(listed) == sorted(COMMANDS)


def _validated(config_file: Path) -> dict:
    from snakemake.utils import validate

    config = yaml.safe_load(config_file.read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return config


@pytest.mark.parametrize("caption", sorted((ROOT / "workflow" / "report").glob("*.rst")))
def test_snakemake_report_captions_read_only_existing_config_keys(caption: Path) -> None:
    """Every caption renders against a real config with its defaults; a key that is not
    there (``training.preset``) is an error, not an empty string."""
    config = _validated(ROOT / ".test" / "config" / "config.yaml")
    snakemake = SimpleNamespace(config=config, wildcards=SimpleNamespace(slide="demo_1"))
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text = environment.from_string(caption.read_text()).render(snakemake=snakemake)
    assert "{{" not in text and text.strip()


def _rule_paths() -> list[str]:
    """Every ``{RESULTS}/...`` path of the rules, as the README writes it: ``results/``,
    the run as ``{encoder}/{method}/seed{seed}``, every wildcard as ``{}``."""
    paths = []
    for rules in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for path in re.findall(r'f"\{RESULTS\}(/[^"]*)"', rules.read_text()):
            for run in ("{RUN}", "{{run}}"):
                path = path.replace(run, "{encoder}/{method}/seed{seed}")
            paths.append("results" + re.sub(r"\{+(\w+)\}+", "{}", path))
    return paths


def test_readme_paths_are_the_workflow_s() -> None:
    """Each ``results/...`` path the README and the architecture notes give is a path (or a
    folder of one) that a rule writes, with the run's folders in order."""
    rule_paths = _rule_paths()
    for doc in ("README.md", "docs/architecture.md"):
        for path in re.findall(r"`(results/[^`\s]*)`", (ROOT / doc).read_text()):
            if "..." in path or "her2st" in path:
                continue
            plain = re.sub(r"\{\w+\}", "{}", path)
            folder = plain.rsplit("/", 1)[0]
            assert any(
                p == plain or p.startswith(plain.rstrip("/") + "/") or p.rsplit("/", 1)[0] == folder
                for p in rule_paths
            ), f"{doc}: {path} is written by no rule (nor beside a rule's output)"


def _demo_config() -> dict:
    """The config ``make demo`` runs (its --configfile, else the Snakefile's default)."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    given = re.findall(r"--configfile\s+(\S+)", recipe)
    return yaml.safe_load((ROOT / (given[0] if given else "config/config.yaml")).read_text())


def test_readme_says_what_the_demo_runs() -> None:
    from stevs import methods

    readme = (ROOT / "README.md").read_text()
    intro = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    config = _demo_config()
    deep = [m for m in config["methods"] if methods.REGISTRY[m].kind != "ridge"]
    ridges = [m for m in config["methods"] if methods.REGISTRY[m].kind == "ridge"]
    for method in deep:
        assert f"`{method}`" in intro, f"README's demo paragraph does not name {method}"
    numbers = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
    said = re.search(r"the (\w+) ridge probes", intro)
    assert said and numbers[said.group(1)] == len(ridges)
    encoders = re.search(r"on (\w+) encoders", intro)
    assert encoders and numbers[encoders.group(1)] == len(config["encoders"])
    if not (config.get("predict_slides") or {}).get("sheet"):
        assert "H&E-only" not in intro


def test_readme_shows_the_report_s_first_screen() -> None:
    readme = (ROOT / "README.md").read_text()
    shot = re.search(r"\]\((docs/[\w.-]+\.png)\)", readme)
    assert shot, "README shows no screenshot of the report"
    picture = ROOT / shot.group(1)
    assert picture.is_file() and picture.stat().st_size < 300_000
