"""What a device accepts from ``cmd/update`` and ``cmd/rollback``: signed, monotonic model identity (issue 13).

Anyone who can publish on the broker can send commands, and commands are not signed, so every decision rests on
signed material only:

* the bundle's manifest (signed) names the model, its ``version_code`` and the ``fleets`` it may run in. A device
  running model M with version_code C installs only M with a version_code above C (an old bundle without a
  version_code installs only on a device running none, or running an old bundle itself);
* anything else — a lower or equal-but-different version_code, a bundle without one, another model — needs a
  rollback authorisation (:mod:`edge_sdk.rollback_auth`) signed by a trusted release key that names the change:
  the model, the version left (``from_*``), the target (``to_*``), optionally the fleet;
* an authorisation is used once, and an executed ``cmd/rollback`` is remembered by its ``command_id``: both are kept
  in the store's ``state.json`` (so across restarts) until they expire; commands past their ``expires_at`` are
  refused.
"""

from __future__ import annotations

import re
import time
from typing import Any

from edge_sdk.bundle import Bundle, Manifest
from edge_sdk.device_agent.model_store import ModelStore, VersionInfo, write_json_atomic
from edge_sdk.errors import EdgeSDKError

__all__ = ["Guard", "Identity", "identity_of"]

_STATE_KEY = "guard"
_MAX_REMEMBERED = 500
_DEFAULT_KEEP_S = 30 * 86400.0
_COMMAND_ID = re.compile(r"^[0-9A-Za-z_.:-]{1,64}$")

Identity = tuple[str, str, "int | None"]
"""``(name, version, version_code)`` of a bundle."""


def identity_of(info: VersionInfo | None) -> tuple[str, str, int | None] | None:
    """The signed identity of an installed version (read from its verified manifest), or None."""
    if info is None:
        return None
    try:
        m = Bundle.load(info.bundle_path).manifest
    except EdgeSDKError:
        return (info.name, info.version, None)
    return (m.name, m.version, m.version_code)


def _label(ident: tuple[str, str, int | None]) -> str:
    name, version, code = ident
    return f"{name}:{version} (version_code {code})" if code is not None else f"{name}:{version} (no version_code)"


class Guard:
    """The identity policy and the persisted memory of used command ids and authorisations for one store."""

    def __init__(self, store: ModelStore, fleet: str | None = None) -> None:
        self.store = store
        self.fleet = fleet

    # ---- commands ----------------------------------------------------------------------------------------------

    def command_problem(self, name: str, payload: dict[str, Any], now: float | None = None) -> str | None:
        """Why this command must not run (expired, duplicate, malformed id), or None."""
        now = time.time() if now is None else now
        cid = payload.get("command_id")
        if cid is not None and (not isinstance(cid, str) or not _COMMAND_ID.match(cid)):
            return f"cmd/{name} has a malformed command_id: send a 32-hex-digit id"
        exp = payload.get("expires_at")
        if exp is not None:
            if isinstance(exp, bool) or not isinstance(exp, int | float):
                return f"cmd/{name} has a malformed expires_at {str(exp)[:40]!r}: send seconds since the epoch"
            if now > exp:
                return f"cmd/{name} {cid or ''} expired at {exp:.0f} (device clock {now:.0f}): send a new command"
        if name == "rollback":
            if not cid:
                return "cmd/rollback needs a command_id (it is not idempotent): send one"
            if self.seen("commands", cid):
                return f"cmd/rollback {cid} is a duplicate: it was carried out already"
        return None

    # ---- memory ------------------------------------------------------------------------------------------------

    def _memory(self) -> dict[str, dict[str, float]]:
        mem = self.store.read_state().get(_STATE_KEY)
        mem = mem if isinstance(mem, dict) else {}
        return {k: dict(v) if isinstance(v, dict) else {} for k, v in
                ((k, mem.get(k)) for k in ("commands", "authorisations"))}

    def seen(self, kind: str, ident: str) -> bool:
        """True when this command id / authorisation id was used before (on this store, across restarts)."""
        return ident in self._memory().get(kind, {})

    def remember(self, *, command_id: str | None = None, authorisation: dict[str, Any] | None = None,
                 expires_at: float | None = None) -> None:
        """Record a used command id and/or authorisation, atomically, pruning what expired."""
        if not command_id and not authorisation:
            return
        now = time.time()
        with self.store.lock():
            state = self.store.read_state()
            mem = self._memory()
            if command_id:
                mem["commands"][command_id] = float(expires_at or now + _DEFAULT_KEEP_S)
            if authorisation:
                mem["authorisations"][str(authorisation["id"])] = float(authorisation.get("expires_at") or
                                                                         now + _DEFAULT_KEEP_S)
            for k, items in mem.items():
                live = sorted(((i, t) for i, t in items.items() if t >= now - 60), key=lambda x: x[1])
                mem[k] = dict(live[-_MAX_REMEMBERED:])
            state[_STATE_KEY] = mem
            write_json_atomic(self.store.state_path, state)

    # ---- bundles -----------------------------------------------------------------------------------------------

    def bundle_problem(self, m: Manifest, manifest_sha256: str, current: VersionInfo | None,
                       auth: dict[str, Any] | None) -> tuple[str | None, bool]:
        """``(why the device must not switch to this bundle or None, whether the authorisation was needed)``."""
        if m.fleets:
            if self.fleet is None:
                return (f"{m.name}:{m.version} may run only in fleet(s) {', '.join(m.fleets)} and this device's fleet "
                        "is not configured: pass the fleet to the Updater (fleet=...)"), False
            if self.fleet not in m.fleets:
                return (f"{m.name}:{m.version} may run only in fleet(s) {', '.join(m.fleets)}, not in this device's "
                        f"fleet {self.fleet}: refusing it"), False
        cur = identity_of(current)
        if cur is None or (current is not None and current.manifest_sha256 == manifest_sha256):
            return None, False
        new = (m.name, m.version, m.version_code)
        why = self._needs_authorisation(cur, new)
        if why is None:
            return None, False
        if auth is None:
            return f"{why}: a rollback needs an authorisation signed by a trusted release key", False
        mismatch = self.authorisation_mismatch(auth, cur, new)
        if mismatch:
            return f"{why}, and the rollback authorisation {str(auth.get('id'))[:12]} {mismatch}", False
        if self.seen("authorisations", str(auth["id"])):
            return f"{why}, and the rollback authorisation {str(auth['id'])[:12]} was used already", False
        return None, True

    @staticmethod
    def _needs_authorisation(cur: tuple[str, str, int | None], new: tuple[str, str, int | None]) -> str | None:
        if new[0] != cur[0]:
            return f"the bundle is model {new[0]!r} ({_label(new)}), this device runs model {cur[0]!r}"
        if cur[2] is None:
            return None  # an old bundle without version_code is running: no order to keep yet
        if new[2] is None:
            return f"the bundle {_label(new)} cannot be ordered after the running {_label(cur)}"
        if new[2] < cur[2]:
            return f"the bundle has version_code {new[2]}, lower than the running {_label(cur)}: refusing a downgrade"
        if new[2] == cur[2]:
            return f"the bundle {_label(new)} has the same version_code as the running one but other content"
        return None

    def authorisation_mismatch(self, auth: dict[str, Any], cur: tuple[str, str, int | None] | None,
                               new: tuple[str, str, int | None] | None) -> str | None:
        """How a verified authorisation statement fails to name the change ``cur`` -> ``new`` (None: it names it)."""
        checks = [("name", cur[0] if cur else None), ("from_version", cur[1] if cur else None),
                  ("from_version_code", cur[2] if cur else None), ("to_name", new[0] if new else None),
                  ("to_version", new[1] if new else None), ("to_version_code", new[2] if new else None),
                  ("fleet", self.fleet)]
        for key, actual in checks:
            want = auth.get(key)
            if want is not None and actual is not None and str(want) != str(actual):
                return f"names {key} {want!r}, not {actual!r}"
            if key in ("name", "from_version") and want is not None and actual is None:
                return f"names {key} {want!r}, which this device does not run"
        return None
