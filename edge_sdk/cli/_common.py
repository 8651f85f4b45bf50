"""Flags and small parsers shared by every ``edge-sdk`` command group.

Why one module: the same concept used to be spelled differently per command (``--keys`` vs ``--trusted-keys``,
three meanings of ``--store``, two of ``--tolerance``, two of ``--version``) and only two commands read
``EDGE_SDK_MQTT``. Each concept is now defined once here as a parent parser (``add_parser(..., parents=[...])``),
and every old spelling stays accepted as a deprecated alias (:func:`add_alias`) that prints one line to stderr and
behaves exactly like the canonical flag, so scripts keep working. Nothing here imports a framework.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from edge_sdk.errors import EdgeSDKError

__all__ = ["DEFAULT_DB", "DEFAULT_MQTT", "DEPRECATED_ALIASES", "NOTICES", "RegistryHelpFormatter", "add_alias",
           "allow_unsigned_parent", "command_group", "db_parent", "deprecation_notices", "floats", "host_port",
           "http_security", "http_security_parent", "http_workers", "json_parent", "log_parent",
           "model_identity_parent", "model_store_parent", "mqtt_parent",
           "mqtt_tls_parent", "named_shape", "named_values", "registry_parent", "rollback_key_parent",
           "setup_logging", "shape", "shape_spec", "size", "stdout_to_stderr", "trusted_keys_parent", "usage",
           "version", "version_code"]

DEFAULT_DB = "sqlite:///fleet.db"
DEFAULT_MQTT = "mqtt://127.0.0.1:1883"

#: (old spelling, canonical spelling) for every alias registered through :func:`add_alias` (README table, tests);
#: ``--store`` appears twice: it meant the registry directory in some commands, the device model store in others
DEPRECATED_ALIASES: set[tuple[str, str]] = set()
NOTICES = "_deprecation_notices"  # namespace attribute the aliases append to


class _DeprecatedAlias(argparse.Action):
    """An old option string that forwards to the canonical action and records a one-line notice.

    A separate action (not a second option string on the canonical one) so that the notice exists only when the
    old spelling is used, and hidden from ``--help`` so that new users learn one name. The notice is printed by
    ``main`` once the command succeeds (:func:`deprecation_notices`): printing it at parse time would turn the
    one-line error of a failing command, which scripts and tests parse, into two lines."""

    def __init__(self, option_strings: list[str], dest: str, canonical: argparse.Action, **_: Any) -> None:
        super().__init__(option_strings, dest=canonical.dest, nargs=canonical.nargs, type=canonical.type,
                         choices=canonical.choices, metavar=canonical.metavar, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.canonical = canonical

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = self.canonical.option_strings[0]
        notices = list(getattr(namespace, NOTICES, []))
        notice = f"{option_string} is deprecated: use {new}"
        setattr(namespace, NOTICES, notices if notice in notices else [*notices, notice])
        self.canonical(parser, namespace, values, new)


def add_alias(container: Any, canonical: argparse.Action, old: str) -> None:
    """Accept ``old`` as a deprecated spelling of ``canonical`` (added to the same parser or group)."""
    container.add_argument(old, action=_DeprecatedAlias, canonical=canonical)
    DEPRECATED_ALIASES.add((old, canonical.option_strings[0]))


def deprecation_notices(args: argparse.Namespace) -> list[str]:
    """The one-line notices of the deprecated spellings used on this command line (each once)."""
    return list(getattr(args, NOTICES, []))


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def json_parent(help: str = "print JSON on stdout (nothing else goes to stdout)") -> argparse.ArgumentParser:
    """``--json``: machine-readable output on stdout."""
    p = _parent()
    p.add_argument("--json", action="store_true", help=help)
    return p


def log_parent(default: str | None = None) -> argparse.ArgumentParser:
    """``--log-level LEVEL`` and ``--verbose`` (= ``--log-level DEBUG``). Services default to INFO; one-shot
    commands to None: logging stays unconfigured (only warnings, unformatted) unless one of the flags is given."""
    p = _parent()
    shown = default or "warnings only"
    p.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   type=str.upper, help=f"log level (default {shown})")
    p.add_argument("--verbose", "-v", dest="log_level", action="store_const", const="DEBUG",
                   help="same as --log-level DEBUG")
    return p


def setup_logging(level: str | None) -> None:
    """Configure the root logger once, for the services (collector, agent, registry serve, deploy)."""
    import logging

    logging.basicConfig(level=getattr(logging, (level or "INFO").upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def mqtt_parent(*, optional: bool = False, purpose: str = "broker") -> argparse.ArgumentParser:
    """``--mqtt URL``, default ``$EDGE_SDK_MQTT``; when not ``optional``, falls back to the local broker."""
    p = _parent()
    env = os.environ.get("EDGE_SDK_MQTT")
    default = env if optional else (env or DEFAULT_MQTT)
    fallback = "none" if optional else DEFAULT_MQTT
    p.add_argument("--mqtt", metavar="URL", default=default,
                   help=f"{purpose}: mqtt://HOST:1883 or mqtts://HOST:8883 (default $EDGE_SDK_MQTT or {fallback})")
    return p


def mqtt_tls_parent() -> argparse.ArgumentParser:
    """MQTT client identity and TLS: ``--client-id --username --password --ca-file --cert-file --key-file``."""
    p = _parent()
    p.add_argument("--client-id", help="MQTT client id (fixed, for the persistent session; default "
                   "edge-collector-<hostname>; give each collector on one host its own)")
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password", help="MQTT password (default $EDGE_SDK_MQTT_PASSWORD)")
    p.add_argument("--ca-file", help="CA certificate that signed the broker's certificate (TLS)")
    p.add_argument("--cert-file", help="client certificate (TLS client authentication)")
    p.add_argument("--key-file", help="private key of --cert-file")
    return p


def trusted_keys_parent(*, required: bool = False, old: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """``--trusted-keys DIR|FILE`` (repeatable): public keys allowed to sign bundles; ``old`` spellings alias it."""
    p = _parent()
    # required through a one-member group: argparse's own "required" would not count a deprecated alias as given
    g = p.add_mutually_exclusive_group(required=required) if required and old else p
    act = g.add_argument("--trusted-keys", action="append", metavar="DIR|FILE", required=required and not old,
                         help="trusted ed25519 public keys (.pub.pem): a directory or a file, repeatable")
    for o in old:
        add_alias(g, act, o)
    return p


def allow_unsigned_parent() -> argparse.ArgumentParser:
    """``--allow-unsigned``: one meaning everywhere (agent updates, registry promote, deploy), development only."""
    p = _parent()
    p.add_argument("--allow-unsigned", action="store_true",
                   help="development only: accept bundles whose signature was not verified by a trusted key")
    return p


def rollback_key_parent() -> argparse.ArgumentParser:
    """``--rollback-key KEY``: the release key (private) that signs rollback authorisations for ``deploy`` and
    ``rollback``; devices refuse a lower version without one (edge_sdk.rollback_auth)."""
    p = _parent()
    p.add_argument("--rollback-key", metavar="KEY",
                   help="private release key (`edge-sdk keys new`, trusted by the devices) that signs rollback "
                        "authorisations; needed for bundles with a version_code")
    return p


def version_code(text: str) -> int:
    """``--version-code N``: a whole number >= 0 (higher = newer)."""
    try:
        code = int(text)
    except ValueError:
        code = -1
    if code < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 0 (higher = newer)")
    return code


def model_identity_parent() -> argparse.ArgumentParser:
    """``--version-code N`` and ``--fleet F`` (repeatable, dest ``fleets``): the signed model identity that
    ``convert``/``build`` write into the manifest and ``bundle sign`` signs (devices refuse lower versions)."""
    p = _parent()
    g = p.add_argument_group("signed model identity (written into the manifest, under its signature)")
    g.add_argument("--version-code", type=version_code, metavar="N",
                   help="monotonic version number, higher = newer: devices refuse a lower one without a signed "
                        "rollback authorisation")
    g.add_argument("--fleet", dest="fleets", action="append", metavar="FLEET",
                   help="a fleet the bundle may run in (repeatable; default: any fleet)")
    return p


def http_workers(text: str) -> int:
    """``--http-workers N``: HTTP threads, 1 to 256."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of threads between 1 and 256")
    return n


def http_security_parent(what: str = "the HTTP API") -> argparse.ArgumentParser:
    """Bearer token, TLS and threads of an HTTP server (``agent run`` and ``collector run`` alike).

    Why one parent: the agent's API and the collector's dashboard enforce the same rule (a non-loopback address
    needs a token unless ``--http-insecure``), so they take the same flags. The token is read from a file or an
    environment variable, never from a command-line value (``ps`` shows those to every user)."""
    p = _parent()
    g = p.add_argument_group(f"security of {what} (--http)")
    # both token flags given is a one-line ConfigError from HTTPSecurity.load (an argparse mutually exclusive group
    # would move them out of this help section when the parent is copied)
    g.add_argument("--http-token-file", metavar="FILE", help="file holding the API token (one line, >= 16 "
                     "characters): every route but /ping and /healthz then needs 'Authorization: Bearer <token>'")
    g.add_argument("--http-token-env", metavar="NAME", help="environment variable holding the API token "
                     "(instead of --http-token-file; e.g. a container secret)")
    g.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (with --tls-key)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--http-insecure", action="store_true", default=None,
                   help="serve a non-loopback --http address without a token (refused otherwise)")
    g.add_argument("--http-workers", type=http_workers, metavar="N", help="HTTP threads (default: sized to the "
                   "server's queue)")
    return p


def http_security(args: argparse.Namespace) -> Any:
    """The :class:`~edge_sdk.httpbase.HTTPSecurity` of the :func:`http_security_parent` flags (token read now)."""
    from edge_sdk.httpbase import HTTPSecurity

    return HTTPSecurity.load(token_file=args.http_token_file, token_env=args.http_token_env, tls_cert=args.tls_cert,
                             tls_key=args.tls_key, allow_insecure=bool(args.http_insecure))


def db_parent() -> argparse.ArgumentParser:
    """``--db URL``: the fleet database, default ``$EDGE_SDK_DB`` or ``sqlite:///fleet.db``."""
    p = _parent()
    p.add_argument("--db", default=os.environ.get("EDGE_SDK_DB", DEFAULT_DB),
                   help=f"database URL: sqlite:///PATH or postgresql://... (default $EDGE_SDK_DB or {DEFAULT_DB})")
    return p


def registry_parent() -> argparse.ArgumentParser:
    """``--registry-dir DIR`` (old: ``--store``): where the registry keeps archives, default ``$EDGE_SDK_REGISTRY``."""
    p = _parent()
    act = p.add_argument("--registry-dir", dest="store", metavar="DIR",
                         default=os.environ.get("EDGE_SDK_REGISTRY", "registry"),
                         help="directory of the registry's archives (default $EDGE_SDK_REGISTRY or ./registry)")
    add_alias(p, act, "--store")
    return p


def model_store_parent() -> argparse.ArgumentParser:
    """``--model-store DIR`` (old: ``--store``): the device's crash-safe store for over-the-air updates."""
    p = _parent()
    act = p.add_argument("--model-store", dest="store", metavar="DIR",
                         help="model store for signed over-the-air updates (cmd/update over MQTT); --bundle then "
                              "installs the first model into it")
    add_alias(p, act, "--store")
    return p


# -- small value parsers ------------------------------------------------------------------------------------------
def shape(text: str) -> list[int]:
    """``1,3,224,224`` (or ``1x3x224x224``) -> ``[1, 3, 224, 224]``."""
    try:
        dims = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be integers like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return dims


def named_shape(text: str) -> tuple[str | None, list[int]]:
    """``1,3,224,224`` (the first input) or ``NAME=1,3,224,224`` (one input of a multi-input model)."""
    name, sep, dims = text.rpartition("=") if "=" in text else ("", "", text)
    return (name.strip() or None) if sep else None, shape(dims)


def shape_spec(items: list[tuple[str | None, list[int]]] | None) -> Any:
    """Repeated --input-shape values -> one shape, or {input name: shape}."""
    if not items:
        return None
    if len(items) == 1 and items[0][0] is None:
        return items[0][1]
    if any(name is None for name, _ in items):
        raise EdgeSDKError("--input-shape: name every input when giving several (--input-shape input_ids=1,128 "
                           "--input-shape attention_mask=1,128)")
    return {name: dims for name, dims in items}


def named_values(items: list[str] | None, flag: str) -> Any:
    """Repeated NAME=VALUE (or one bare VALUE for the first input) -> {name: value} or [value]."""
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return [items[0].strip()]
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise EdgeSDKError(f"{flag} {item!r} must look like NAME=VALUE when giving several")
        out[name.strip()] = value.strip()
    return out


def floats(text: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` -> a tuple of floats (``--mean``, ``--std``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from None


def size(text: str) -> tuple[int, int]:
    """``224x224`` -> ``(224, 224)`` (``--resize``)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 224x224") from None
    return h, w


def host_port(text: str, flag: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` too) -> ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        return host.strip("[]"), int(port)
    except ValueError:
        raise EdgeSDKError(f"{flag} {text!r} must look like 127.0.0.1:8080") from None


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """With --json, stdout carries only the JSON: route everything else written to fd 1 (Python prints and
    native libraries' progress output alike) to stderr while the work runs."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def command_group(sub: Any, name: str, help: str, usage_line: str) -> Any:
    """Add the group ``edge-sdk NAME ACTION`` and return the sub-parsers its actions are added to.

    Given without its action the group is a one-line usage error (``usage_line``), never a traceback or a silent
    no-op; the chosen action is in ``args.<name>_command``."""
    g = sub.add_parser(name, help=help)
    g.set_defaults(func=usage(usage_line))
    return g.add_subparsers(dest=f"{name}_command", metavar="ACTION")


class RegistryHelpFormatter(argparse.HelpFormatter):
    """Help texts given as a callable are computed when help is shown.

    Why: the lists of target formats and runtimes come from the registries (built-ins plus entry-point plugins),
    so a plugin appears in ``--help`` with no edit here; filling the registries at parser-build time would cost
    every ``edge-sdk`` start-up the plugin scan, while only ``--help`` needs it."""

    def _format_action(self, action: argparse.Action) -> str:
        if callable(action.help):  # argparse itself needs a str: format a copy that has the computed text
            action = copy.copy(action)
            action.help = action.help()
        return super()._format_action(action)


def usage(text: str) -> Callable[[argparse.Namespace], int]:
    """The handler of a command group given without its action: a one-line error naming the actions."""
    def _usage(args: argparse.Namespace) -> int:
        raise EdgeSDKError(f"usage: {text}")

    return _usage


def version() -> str:
    """The installed edge-sdk version (imported lazily: ``edge_sdk`` itself is light, but keep the CLI lazier)."""
    from edge_sdk import __version__

    return __version__
