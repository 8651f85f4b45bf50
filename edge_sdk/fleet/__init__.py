"""Fleet side (host): the telemetry collector, its database, alerts, dashboard, simulator, registry and deploy.

Nothing here is needed on a device; the device agent (``edge_sdk.device_agent``) never imports this package.
"""

__all__: list[str] = []
