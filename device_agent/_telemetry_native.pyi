"""Types of the optional C telemetry request path (``_telemetry_native.c``)."""

from collections.abc import Callable, Sequence
from typing import Any

MAX_CLASSES: int

class Accumulator:
    model: Any
    tag: Any
    pending: int
    limit: int
    limit_bytes: int
    def __init__(
        self,
        fallback: Callable[[Any, Any, Any, int, bool], None],
        unusual: Callable[[Any, Any, Any, int, bool], None],
        on_full: Callable[[], None],
        draw: Callable[[], float],
        rate: float,
        latency_edges: Sequence[float],
        confidence_edges: Sequence[float],
    ) -> None: ...
    def record(self, model: Any, inputs: Any, outputs: Any, latency_ns: int) -> None: ...
    def arm(
        self,
        model: Any,
        tag: Any,
        input: str,
        output: str,
        in_type: int,
        in_row_bytes: int,
        out_type: int,
        out_row_items: int,
        classes: int,
    ) -> None: ...
    def take(self, disarm: bool) -> tuple[Any, ...] | None: ...
