"""Fleet side (host). Nothing here is needed on a device; the device agent never imports this package.

* :mod:`edge_sdk.fleet.collector` — MQTT telemetry into the database, validation, gap repair, alerts.
* :mod:`edge_sdk.fleet.lifecycle` — model registry, evaluation gate, staged rollout, canary judgement, commands,
  the bundle server.
* :mod:`edge_sdk.fleet.dashboard` — the collector's HTTP API, dashboard and status table.
* :mod:`edge_sdk.fleet.db` — the fleet database (SQLite or PostgreSQL) and its migrations, shared by all three.
* ``edge_sdk/fleet/broker/`` — the production Mosquitto configuration and ACL (data files).

Simulated devices and test brokers live in :mod:`edge_sdk.testing`, not here.
"""

__all__: list[str] = []
