"""The `darwin` command line: one subcommand per phase, and the whole run.

Each subcommand lives in its own module with `add_arguments(parser)` and `command(args) -> int`; only the
module of the command being run is imported, so `darwin merge` does not pay for Prefect or lm-eval at start-up.
User errors (`DarwinError`) print as one line and exit 2, also when raised inside a flow; no traceback.
`-q` shows errors and results only (no progress bars, Prefect's warnings and up); `-v` adds debug logs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import re
import sys
from importlib import metadata

# How Prefect's temporary server says it did not start in time (prefect/server/api/server.py)
PREFECT_START_FAILED = "Timed out while attempting to connect to ephemeral Prefect API server"
COMMANDS = {
    "profile": ("flows.mri", "Phase 0: per-tensor MRI of a model (norm, std, entropy), fanned out per shard"),
    "merge": ("flows.merge", "merge two parents with a genome and a method (its --help lists the methods)"),
    "probe": ("flows.probe", "Phase 0: probe layer importance (and MoE routing) of a model"),
    "health": ("flows.health", "Phase 3: child against both parents, layer by layer"),
    "evolve": ("flows.evolve", "the whole run from a config: MRI, CMA-ES phases 1 and 2, health, release"),
    "quantize": ("flows.quantize", "release: the child quantized by a scheme (--help lists them) and its roundtrip"),
    "publish": ("flows.publish", "upload a run or model with model card and manifest to s3:// or a path"),
    "demo": ("flows.demo", "build demo parents and run the whole pipeline offline; the child beats both"),
}


def _import_frozen(module_name: str):
    """Import a command's module with the garbage collector off, then freeze what the import made: those objects
    live as long as the process. Otherwise torch's import alone runs collections over its growing heap, and the exit
    one more over all of it (about a quarter of a small `darwin merge`'s start and stop on 2 cores)."""
    gc.disable()
    try:
        return importlib.import_module(module_name)
    finally:
        gc.freeze()
        gc.enable()


class _UserErrorLines(logging.Filter):
    """Drops the console lines Prefect logs for a DarwinError raised inside a task or flow (its traceback, and the
    run's "Finished in state Failed(... DarwinError ...)"): the command ends with the error's one line instead.
    Prefect's API still receives every record, so the UI keeps the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from darwin.errors import DarwinError

        if record.exc_info and isinstance(record.exc_info[1], DarwinError):
            return False
        names = {DarwinError.__name__, *(cls.__name__ for cls in DarwinError.__subclasses__())}
        return not (record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
                    and any(name in record.getMessage() for name in names))


def _quiet_user_errors() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)):
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_UserErrorLines())


def device_type(text: str) -> str:
    """argparse type of every --device: refused at once, not when a phase first reaches for the device."""
    from darwin.runtime import DEVICE_PATTERN

    if not re.match(DEVICE_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda or cuda:N)")
    return text


# What -q and -v set, before a command's module is imported: Prefect and transformers read them at import
QUIET_ENV = {"DARWIN_QUIET": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "PREFECT_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error"}
VERBOSE_ENV = {"PREFECT_LOGGING_LEVEL": "DEBUG", "TRANSFORMERS_VERBOSITY": "info"}


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="errors and results only: no progress, no logs")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logs of darwin, Prefect and transformers")


def _set_verbosity(argv: list[str]) -> None:
    if any(arg in ("-q", "--quiet") for arg in argv):
        os.environ.update(QUIET_ENV)
    elif any(arg in ("-v", "--verbose") for arg in argv):
        os.environ.update(VERBOSE_ENV)
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")


def _version() -> str:
    try:
        return metadata.version("darwin-merge")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """`argv` None: this process is the command (the console script), so its imports may be frozen."""
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="darwin", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"darwin {_version()}")
    _add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # -q / -v may come before the command (darwin -q merge ...) or among its options
    leading = argv[:next((i for i, arg in enumerate(argv) if arg in COMMANDS), len(argv))]
    if len(leading) == len(argv) or any(arg not in ("-q", "--quiet", "-v", "--verbose") for arg in leading):
        parser.parse_args(argv or ["--help"])  # --version, --help and unknown commands exit here
        parser.error("a COMMAND is required")
    name, rest = argv[len(leading)], leading + argv[len(leading) + 1:]
    _set_verbosity(rest)
    module = (_import_frozen if own_process else importlib.import_module)(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"darwin {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    _add_verbosity(command_parser)
    args = command_parser.parse_args(rest)
    from darwin.errors import DarwinError

    if "prefect" in sys.modules:  # the command runs flows: Prefect's logging is configured
        _quiet_user_errors()

    try:
        return int(module.command(args) or 0)
    except DarwinError as exc:
        print(f"darwin {name}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not str(exc).startswith(PREFECT_START_FAILED):
            raise
        print(f"darwin {name}: error: Prefect's temporary API server did not answer within "
              f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s; raise "
              "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"darwin {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
