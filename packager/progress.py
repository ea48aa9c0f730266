"""Progress for a packaging run: a rich progress bar per profile, and/or an event callback."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from packager.profiles import HardwareProfile

EventFn = Callable[[str, str], None]


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class Reporter:
    """Progress: a rich progress bar per profile (``progress=True``), and/or an event callback."""

    def __init__(self, profiles: list[HardwareProfile], rich_progress: bool, on_event: EventFn | None) -> None:
        self._on_event = on_event
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        if rich_progress:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[profile]:<18}"),
                BarColumn(bar_width=24),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            for p in profiles:
                # total: pre-processing steps + a few per rung; the bar completes on done().
                total = 4 + 4 * len(p.ladder)
                self._tasks[p.id] = self._progress.add_task("waiting", total=total, profile=p.id)

    def __enter__(self) -> Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def event(self, profile: str, message: str) -> None:
        if self._on_event is not None:
            self._on_event(profile, message)
        if self._progress is not None and profile in self._tasks:
            with self._lock:
                self._progress.update(self._tasks[profile], description=escape(message[:80]), advance=1)

    def done(self, profile: str, ok: bool, detail: str) -> None:
        if self._on_event is not None:
            self._on_event(profile, f"{'done' if ok else 'FAILED'}: {detail}")
        if self._progress is not None and profile in self._tasks:
            task = self._tasks[profile]
            with self._lock:
                total = self._progress.tasks[[t.id for t in self._progress.tasks].index(task)].total
                mark = "[green]ok[/green]" if ok else "[red]failed[/red]"
                self._progress.update(task, completed=total, description=f"{mark} {escape(detail[:80])}")
