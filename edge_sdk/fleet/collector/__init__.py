"""The fleet collector: MQTT telemetry, events and status into the fleet database; validation, gap repair, alerts."""

__all__: list[str] = []
