"""The ``edge-sdk`` command: this module only wires the command groups together and runs the chosen handler.

Each group lives in its own module with a ``register(sub)`` that adds its sub-parsers and sets ``func`` on every
leaf command (huggingface_hub's layout); flags that several groups share (``--json``, ``--log-level``/``--verbose``,
``--mqtt``, ``--trusted-keys``, ``--db``, ...) come from the parent parsers in ``_common``, so one concept has one
spelling everywhere and old spellings keep working as deprecated aliases. Handlers import their implementation
inside their body, so ``edge-sdk --help`` loads no framework.

Exit codes: 0 success, 1 an artifact failed validation (the bundle holds the others) or a check/verification
refused, 2 bad input or a missing dependency (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from edge_sdk.cli import agent, bundle, collector, convert, data, fleet, optimize, pipeline, registry, targets, web
from edge_sdk.cli._common import deprecation_notices, setup_logging, version
from edge_sdk.errors import EdgeSDKError, MissingDependencyError

__all__ = ["GROUPS", "build_parser", "main"]

#: the command-group modules, in the order ``edge-sdk --help`` lists their commands
GROUPS = (convert, agent, targets, bundle, registry, collector, fleet, data, pipeline, optimize, web)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``edge-sdk``: every group registers its own sub-commands."""
    p = argparse.ArgumentParser(prog="edge-sdk", description="Convert, validate and bundle models for devices.")
    p.add_argument("--version", action="version", version=f"edge-sdk {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-sdk`` (console script and ``python -m edge_sdk.cli``)."""
    from edge_sdk._quiet import quiet_third_party

    parser = build_parser()
    args = parser.parse_args(argv)
    # before any framework loads: third-party logs and warnings off unless --verbose / EDGE_SDK_VERBOSE=1, and
    # OpenVINO's telemetry declined in-process (it forks per event: a deadlock risk once JAX is loaded)
    quiet_third_party(getattr(args, "log_level", None) == "DEBUG")
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "log_level", None):  # one-shot commands: only when asked; services configure their own
        setup_logging(args.log_level)
    try:
        code = args.func(args)
    except MissingDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EdgeSDKError, ValueError) as exc:  # ValueError: bad enum names and numeric arguments
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    if code == 0:  # after the work, and never on a failure: a failing command's error stays one line
        for notice in deprecation_notices(args):
            print(notice, file=sys.stderr)
    return code
