"""``edge-sdk targets``: list the target device profiles (``edge_sdk.targets``, imported in the handler)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge_sdk.cli._common import json_parent, log_parent

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``targets``."""
    tg = sub.add_parser("targets", help="list the target device profiles",
                        parents=[json_parent("print the profiles as JSON"), log_parent()])
    tg.set_defaults(func=_cmd_targets)


def _cmd_targets(args: argparse.Namespace) -> int:
    from edge_sdk.targets import format_profiles, list_profiles

    profiles = list_profiles()
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
    else:
        print(format_profiles(profiles))
    return 0
