"""``edge-sdk web serve BUNDLE``: serve a bundle's web artifacts locally, with the headers WASM threads need."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edge_sdk.cli._common import log_parent

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``web serve``."""
    web = sub.add_parser("web", help="browser (WebAssembly) artifacts: serve them locally")
    wsub = web.add_subparsers(dest="web_command", metavar="COMMAND", required=True)
    sv = wsub.add_parser("serve", parents=[log_parent()],
                         help="serve a bundle (or one web artifact folder) with cross-origin isolation headers",
                         description="A small static server for trying web artifacts: every answer carries "
                                     "Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: "
                                     "require-corp, which multi-threaded WASM needs (a static host must send the "
                                     "same two headers). Loopback only unless --allow-remote.")
    sv.add_argument("bundle", metavar="BUNDLE", help="a bundle folder with web artifacts, or a web/<precision> folder")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--precision", default=None, help="which web artifact / opens (default: the first)")
    sv.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    sv.set_defaults(func=_cmd_serve)


def _pages(root: Path) -> list[tuple[str, str]]:
    """(precision, page path) of every web artifact under ``root`` (a bundle or one artifact folder)."""
    from edge_sdk.errors import BundleError

    if (root / "model.json").is_file() and (root / "index.html").is_file():
        cfg = json.loads((root / "model.json").read_text())
        return [(str(cfg.get("precision", "")), "/index.html")]
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise BundleError(f"{root} is neither a bundle (no manifest.json) nor a web artifact folder (no model.json): "
                          "give the --out folder of `edge-sdk convert --to web`")
    arts = json.loads(manifest.read_text()).get("artifacts", [])
    pages = [(str(a.get("precision")), "/" + str(a["path"]).strip("/") + "/index.html")
             for a in arts if a.get("format") == "web"]
    if not pages:
        raise BundleError(f"bundle {root} has no web artifact: convert with --to web")
    return pages


def _cmd_serve(args: argparse.Namespace) -> int:
    from edge_sdk.errors import EdgeSDKError
    from edge_sdk.runtimes.web_server import serve_site

    root = Path(args.bundle)
    if not root.is_dir():
        raise EdgeSDKError(f"{root} is not a folder: give a bundle or a web artifact folder")
    if not 0 <= args.port <= 65535:
        raise EdgeSDKError(f"--port {args.port} is not a port: give 0..65535")
    pages = _pages(root)
    chosen = [p for p in pages if args.precision in (None, p[0])]
    if not chosen:
        raise EdgeSDKError(f"no web artifact of precision {args.precision!r}: choose from "
                           + ", ".join(p for p, _ in pages))
    site = serve_site(root, args.host, args.port, index=chosen[0][1], allow_remote=args.allow_remote)
    for prec, page in pages:
        print(f"{prec}: {site.url}{page}")
    print(f"serving {root} at {site.url} (cross-origin isolated; Ctrl-C stops)", flush=True)
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    finally:
        site.stop()
