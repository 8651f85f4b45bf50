"""Progress and result tables on stderr (rich); silent when quiet (``--json``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["Reporter", "fmt_bytes", "stderr_console"]


def stderr_console() -> Any:
    """A rich Console on stderr; 160 columns when stderr is not a terminal (logs, CI)."""
    import sys

    from edge_sdk._deps import require

    console = require("rich.console", "host", "progress and result tables")
    return console.Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def fmt_bytes(n: int | None) -> str:
    """Human-readable size."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Reporter:
    """Shows each long step with a spinner and its duration; prints the validation table."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._console: Any = None
        if not quiet:
            self._console = stderr_console()

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with self._outcome(text), self._console.status(text + " …"):
            yield

    @contextmanager
    def _outcome(self, text: str) -> Iterator[None]:
        """Print the step's line when it ends: ✓ or ✗, and how long it took."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._console.print(f"[red]✗[/red] {text} ({time.perf_counter() - start:.1f} s)")
            raise
        self._console.print(f"[green]✓[/green] {text} ({time.perf_counter() - start:.1f} s)")

    @contextmanager
    def progress(self, text: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar for a long loop: yields ``advance(done, total)``; prints the step's line when done."""
        if self.quiet:
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=self._console, transient=True)
        task = bar.add_task(text, total=None)
        with self._outcome(text), bar:
            yield lambda done, total: bar.update(task, completed=done, total=total)

    def table(self, results: Sequence[Any], with_accuracy: bool = False) -> None:
        if self.quiet:
            return
        from rich.table import Table

        t = Table(title="validation against the source model")
        for col in ("artifact", "status", "route", "size", "cosine", "max abs err", "top-1 agree", "top-1 (conf.)",
                    "top-5 cont."):
            t.add_column(col, justify="right" if col not in ("artifact", "status", "route") else "left")
        if with_accuracy:
            t.add_column("accuracy (source)", justify="right")
        t.add_column("notes", overflow="fold", max_width=60)
        colour = {"passed": "green", "failed": "red", "error": "red", "skipped-validation": "yellow",
                  "unsupported": "yellow"}
        for r in results:
            v = r.validation
            row = [r.key, f"[{colour.get(r.status, 'white')}]{r.status}[/]", getattr(r, "route", "") or "-",
                   fmt_bytes(r.size_bytes),
                   _num(v.cosine, 5), _num(v.max_abs_error, 3, sci=True), _pct(v.top1_agreement),
                   _pct(v.top1_agreement_confident), _pct(v.top5_containment)]
            if with_accuracy:
                row.append(f"{_pct(v.accuracy)} ({_pct(v.source_accuracy)})")
            row.append(r.reason.split(" (")[0][:200] if r.status == "skipped-validation" else r.reason[:600])
            t.add_row(*row)
        self._console.print(t)


def _num(x: float | None, digits: int, sci: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}e}" if sci else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
