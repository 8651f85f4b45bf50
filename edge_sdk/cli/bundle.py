"""``edge-sdk inspect | verify | archive | keys new | bundle sign | bundle verify``: look at, check, pack and sign
a bundle that already exists. Nothing here converts or runs a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_sdk.cli._common import command_group, json_parent, log_parent, model_identity_parent, trusted_keys_parent

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``inspect``, ``verify``, ``archive``, ``keys new``, ``bundle sign`` and ``bundle verify``."""
    i = sub.add_parser("inspect", help="show a bundle's artifacts and validation",
                       parents=[json_parent("print the manifest as JSON"), log_parent()])
    i.add_argument("bundle")
    i.set_defaults(func=_cmd_inspect)
    v = sub.add_parser("verify", help="check every file of a bundle against its sha256", parents=[log_parent()])
    v.add_argument("bundle")
    v.set_defaults(func=_cmd_verify)
    a = sub.add_parser("archive", help="pack a bundle into one .tar.gz", parents=[log_parent()])
    a.add_argument("bundle")
    a.add_argument("--out", help="archive path (default: beside the bundle, BUNDLE_DIR.tar.gz)")
    a.set_defaults(func=_cmd_archive)

    ksub = command_group(sub, "keys", "signing keys for bundles", "edge-sdk keys new [--dir DIR] [--name NAME]")
    kn = ksub.add_parser("new", help="make an ed25519 key pair (NAME.key private, NAME.pub.pem for devices)",
                         parents=[log_parent()])
    kn.add_argument("--dir", default="keys", help="directory for the key files (default ./keys)")
    kn.add_argument("--name", help="file name stem (default key-<key id>)")
    kn.set_defaults(func=_cmd_keys_new)

    bsub = command_group(sub, "bundle", "sign a bundle or verify its signature",
                         "edge-sdk bundle sign BUNDLE --key KEY [--version-code N] [--fleet F] | edge-sdk bundle "
                         "verify BUNDLE --trusted-keys DIR")
    bs = bsub.add_parser("sign", help="sign a bundle directory's manifest (again with another key to co-sign); "
                         "--version-code and --fleet are written into the manifest first, so they are signed",
                         parents=[model_identity_parent(), log_parent()])
    bs.add_argument("bundle")
    bs.add_argument("--key", required=True, help="private key file made by `edge-sdk keys new`")
    bs.set_defaults(func=_cmd_bundle_sign)
    bv = bsub.add_parser("verify", help="check a bundle's signature and files against trusted public keys "
                         "(exit 1 when refused)", parents=[trusted_keys_parent(required=True, old=("--keys",)),
                                                           log_parent()])
    bv.add_argument("bundle", help="bundle directory or .tar.gz")
    bv.set_defaults(func=_cmd_bundle_verify)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle
    from edge_sdk.progress import fmt_bytes

    b = Bundle.load(args.bundle)
    if args.json:
        print(json.dumps(b.manifest.to_dict(), indent=2))
        return 0
    m = b.manifest
    print(f"{m.name}:{m.version}  task={m.task}  source={m.source.get('framework')} {m.source.get('file')}")
    for a in m.artifacts:
        v = a.validation
        state = "passed" if v.passed else ("skipped: " + (v.skipped_reason or "") if v.passed is None else "FAILED")
        cos = f"cos={v.cosine:.5f}" if v.cosine is not None else ""
        print(f"  {a.key:<20} {fmt_bytes(a.size_bytes):>10}  {a.path:<32} {cos} {state}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle

    b = Bundle.load(args.bundle)
    b.verify()
    print(f"ok: {len(b.artifacts)} artifacts match their sha256")
    return 0


def _cmd_archive(args: argparse.Namespace) -> int:
    from edge_sdk.bundle import Bundle

    b = Bundle.load(args.bundle)
    b.verify()
    print(b.archive(Path(args.out) if args.out else None))
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from edge_sdk.signing import generate_keypair, load_public_keys

    private, public = generate_keypair(args.dir, args.name)
    kid = next(iter(load_public_keys(public)))
    print(f"key id: {kid}\nprivate key: {private} (keep it secret; sign with --key {private})\n"
          f"public key: {public} (copy it to the devices' trusted keys directory)")
    return 0


def _cmd_bundle_sign(args: argparse.Namespace) -> int:
    from edge_sdk.signing import sign_bundle

    kid = sign_bundle(args.bundle, args.key, version_code=args.version_code, fleets=args.fleets)
    signed = [f"version_code {args.version_code}"] if args.version_code is not None else []
    signed += [f"fleet(s) {', '.join(args.fleets)}"] if args.fleets else []
    print(f"signed {args.bundle} with key {kid}" + (f" ({'; '.join(signed)})" if signed else ""))
    return 0


def _cmd_bundle_verify(args: argparse.Namespace) -> int:
    from edge_sdk.signing import SignatureError, verify_bundle

    try:
        kid = verify_bundle(args.bundle, args.trusted_keys)
    except SignatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.bundle} is signed by trusted key {kid} and every file matches the manifest")
    return 0
