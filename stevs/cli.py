"""The ``stevs`` command: one subcommand per pipeline stage.

Each subcommand lives in the module that does the work; the module exposes
``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are imported only
when their subcommand runs, so ``stevs ingest`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from dataclasses import fields
from typing import Any, TypeVar

from stevs import __version__
from stevs.atomic import is_disk_error, output_error
from stevs.errors import StevsInputError, StevsInterrupted
from stevs.options import show_ranges

T = TypeVar("T")

#: exit code of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stevs.demo", "generate synthetic H&E slides with known expression"),
    "ingest": ("stevs.io.ingest", "read a slide's image and expression into a slide AnnData"),
    "tile": ("stevs.tiling", "cut spot-centred patches into an HDF5 patch cache"),
    "folds": ("stevs.folds", "write leakage-free fold files with their gene panels"),
    "embed": ("stevs.embed", "embed a slide's patches once with a frozen encoder"),
    "encoders": ("stevs.encoders", "list the encoder presets, their patches and weights"),
    "train": ("stevs.train", "train STevs or a baseline on one fold"),
    "predict": ("stevs.predict", "predict the test slides of one fold"),
    "evaluate": ("stevs.metrics", "score predictions per gene and slide"),
    "run": ("stevs.run", "train, predict and evaluate one fold in one process (the workflow's)"),
    "report": ("stevs.report", "build the HTML report"),
    "predict-slide": ("stevs.predict_slide", "predict expression maps for an H&E-only slide"),
    "export": ("stevs.export", "write a slide or prediction as a SpatialData zarr store"),
    "hest-bench": ("stevs.hest_bench", "run HEST-Benchmark with an encoder preset, STevs beside"),
}


#: the stages in the order the workflow runs them (``snakemake``: the Snakefile), then the
#: commands run on their own
STAGES = ["demo", "ingest", "tile", "folds", "embed", "train", "predict", "evaluate", "report"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, ``(default: X)``, unless the option has none
    (unset, a flag that is off) or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def options_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """A dataclass of options from parsed arguments: every field with a same-named argument,
    then ``values`` (renamed or derived options) on top."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **values})


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stevs",
        description="STevs: spatial gene expression from H&E whole-slide images.\n\n"
        "The Snakemake workflow runs the stages in this order, one command each, for every "
        "slide, fold,\nencoder, method and seed of a config (results under results/, the "
        "report at results/report/index.html):\n\n"
        "  snakemake --cores N --configfile CONFIG.yaml    (make demo: on synthetic slides)\n\n"
        f"  {' -> '.join(STAGES)}\n\n"
        "(embed only for a frozen encoder; train, predict and evaluate of one run and fold in "
        "one process,\n'stevs run'). Each command also runs on its own.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages, in the workflow's order:\n"
        + "\n".join(f"  {name:<14} {COMMANDS[name][1]}" for name in STAGES)
        + "\n\non their own:\n"
        + "\n".join(
            f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items() if name not in STAGES
        )
        + "\n\nRun 'stevs COMMAND --help' for a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"stevs {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def command_parser(command: str) -> tuple[Any, argparse.ArgumentParser]:
    """The module of ``stevs COMMAND`` and its parser (numeric options show their range)."""
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"stevs {command}", description=help_, formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    show_ranges(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stevs`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    command = top.parse_args(argv[:1]).command
    module, parser = command_parser(command)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as stop:  # a bad option (exit 2, argparse's one line) or --help
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = module.run(args)
    except StevsInputError as err:
        return _report(command, err)
    except KeyboardInterrupt as err:
        return _interrupted(command, argv, err)
    except OSError as err:  # a write outside stevs.atomic: full disk, folder not writable
        if not (is_disk_error(err) or isinstance(err, PermissionError)) or not err.filename:
            raise
        return _report(command, output_error(err.filename, err))
    return int(result or 0)


def _report(command: str, err: StevsInputError) -> int:
    """Log and print the one-line error; the exit code of bad input."""
    logging.getLogger("stevs").error("%s", err)
    print(f"stevs {command}: error: {err}", file=sys.stderr)
    return 2


def _interrupted(command: str, argv: list[str], err: KeyboardInterrupt) -> int:
    """Ctrl-C: one line, where it stopped and the command that resumes; exit code 130."""
    where = (
        err.where
        if isinstance(err, StevsInterrupted)
        else "stopped before its output was complete (nothing half-written is kept)"
    )
    line = f"stevs {command}: interrupted: {where}; to go on, rerun: stevs {shlex.join(argv)}"
    logging.getLogger("stevs").warning("%s", line)
    print(line, file=sys.stderr)
    return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
