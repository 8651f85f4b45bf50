"""The MQTT topic tree shared by devices, collectors and deploy tools.

::

    edge/<fleet>/<device>/telemetry     device -> collector   one JSON window (telemetry.schema.json), QoS 1
    edge/<fleet>/<device>/events        device -> collector   one JSON event (event.schema.json), QoS 1
    edge/<fleet>/<device>/status        device -> everyone    retained birth / last will (status.schema.json)
    edge/<fleet>/<device>/cmd/<name>    operator -> device    commands (command.schema.json); ``cmd/update`` is
                                                              retained (the desired model), ``cmd/resend`` asks
                                                              for windows the collector is missing

A device may publish only below its own ``edge/<fleet>/<device>/`` prefix and subscribe only to its own
``cmd/#`` (see ``edge_sdk/fleet/broker/acl``). Fleet and device ids are restricted to ``[A-Za-z0-9_.-]``
so that they never contain MQTT wildcards or separators.
"""

from __future__ import annotations

import re

__all__ = [
    "COMMANDS", "ROOT", "SHARE_GROUP", "cmd_topic", "collector_subscriptions", "device_topic", "parse_topic",
    "validate_id",
]

ROOT = "edge"
SHARE_GROUP = "edge-collectors"
KINDS = ("telemetry", "events", "status")
COMMANDS = ("resend", "update", "rollback")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a legal fleet / device id, else raise ValueError naming the rule."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"{what} {value!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def device_topic(fleet: str, device: str, kind: str) -> str:
    """``edge/<fleet>/<device>/<kind>`` for kind in telemetry / events / status."""
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
    return f"{ROOT}/{validate_id(fleet, 'fleet')}/{validate_id(device, 'device')}/{kind}"


def cmd_topic(fleet: str, device: str, command: str) -> str:
    """``edge/<fleet>/<device>/cmd/<command>``."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return f"{ROOT}/{validate_id(fleet, 'fleet')}/{validate_id(device, 'device')}/cmd/{command}"


def collector_subscriptions(fleet: str = "+", *, shared: bool = True) -> list[str]:
    """Topic filters a collector subscribes to.

    Telemetry and events use an MQTT v5 shared subscription (``$share/edge-collectors/...``) so several
    collectors split the load; status is subscribed normally because retained messages are not delivered
    to shared subscriptions and every collector wants every device's state.
    """
    prefix = f"$share/{SHARE_GROUP}/" if shared else ""
    return [f"{prefix}{ROOT}/{fleet}/+/telemetry", f"{prefix}{ROOT}/{fleet}/+/events", f"{ROOT}/{fleet}/+/status"]


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """``(fleet, device, kind)`` of a device topic (kind may be ``cmd/<name>``), or None if it is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT or not _ID.match(parts[1]) or not _ID.match(parts[2]):
        return None
    kind = "/".join(parts[3:])
    if kind in KINDS or (len(parts) == 5 and parts[3] == "cmd" and parts[4] in COMMANDS):
        return parts[1], parts[2], kind
    return None
