"""The collector's HTTP side: JSON API, dashboard page and assets, the terminal status table."""

__all__: list[str] = []
