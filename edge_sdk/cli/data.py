"""``edge-sdk data export`` (samples captured on devices, from the collector's database and samples folder, into a
folder of images + CSV/JSON for training code and labelling tools) and ``edge-sdk data label`` (labels from a
labelling tool's ``sha256,label`` CSV). The implementation is :mod:`edge_sdk.fleet.samples`, imported in the
handlers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_sdk.cli._common import command_group, db_parent, json_parent, log_parent
from edge_sdk.errors import EdgeSDKError

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``data export`` and ``data label``."""
    dsub = command_group(sub, "data", "captured data samples: export them for training, attach labels",
                         "edge-sdk data export --fleet F --out DIR [--since S] [--policy P] [--labelled] | "
                         "edge-sdk data label --from labels.csv")
    parents = [db_parent(), log_parent()]
    ex = dsub.add_parser("export", help="write a fleet's samples as DIR/images/<sha256>.<ext> + samples.csv/.json + "
                         "export.json", parents=[*parents, json_parent("print export.json on stdout")])
    ex.add_argument("--fleet", required=True, help="the fleet whose samples to export")
    ex.add_argument("--out", required=True, metavar="DIR", help="output folder (new, empty, or an earlier export)")
    ex.add_argument("--since", metavar="ISO|SECONDS", help="only samples captured since this ISO 8601 time, or in "
                    "the last SECONDS")
    ex.add_argument("--policy", metavar="P[,P]", help="only these capture policies: random, low_confidence, drift, "
                    "feedback_disagree")
    ex.add_argument("--labelled", action="store_true", help="only labelled samples")
    ex.set_defaults(func=_cmd_export)
    lab = dsub.add_parser("label", help="attach labels from a sha256,label CSV (unknown hashes are reported)",
                          parents=[*parents, json_parent("print the result as JSON")])
    lab.add_argument("--from", dest="csv", required=True, metavar="CSV", help="labels file: sha256,label rows")
    lab.add_argument("--fleet", help="only samples of this fleet (default: every fleet holding the hash)")
    lab.set_defaults(func=_cmd_label)


def _connect(url: str) -> Any:
    from edge_sdk.fleet.db import Database

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise EdgeSDKError(f"no fleet database at {url}: pass the collector's --db URL")
    db = Database.connect(url)
    db.migrate()
    return db


def _cmd_export(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.samples import export_samples

    with _connect(args.db) as db:
        res = export_samples(db, args.fleet, args.out, since=args.since, policy=args.policy, labelled=args.labelled)
    if args.json:
        print(json.dumps(res.manifest, indent=2))
    else:
        print(f"exported {res.count} sample(s), {res.bytes} bytes of {args.fleet} to {res.out_dir}", file=sys.stderr)
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from edge_sdk.fleet.samples import label_samples

    with _connect(args.db) as db:
        res = label_samples(db, args.csv, fleet=args.fleet)
    if args.json:
        print(json.dumps({"rows": res.rows, "updated": res.updated, "unknown": res.unknown}, indent=2))
    else:
        print(f"labelled {res.updated} sample row(s) from {res.rows} CSV row(s)", file=sys.stderr)
        if res.unknown:
            shown = ", ".join(res.unknown[:5]) + (" ..." if len(res.unknown) > 5 else "")
            print(f"{len(res.unknown)} hash(es) match no sample: {shown}", file=sys.stderr)
    return 0
