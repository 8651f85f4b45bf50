"""Harness for tests, benchmarks and demos: simulated devices, in-process agent fleets, test MQTT brokers.

Not used by the shipped device agent or collector.
"""

__all__: list[str] = []
