"""Numbers for people (edgeota_contract.humanize): units, separators, percent, durations, never exponents."""

from __future__ import annotations

import math

import pytest

from edgeota_contract import humanize as hz


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.00 KB"),
        (4_700, "4.70 KB"),
        (6_600_000, "6.60 MB"),
        (268_435_456, "268 MB"),
        (2_684_354_560, "2.68 GB"),
        (12_345_678_901_234, "12.3 TB"),
    ],
)
def test_size(n: int | None, text: str) -> None:
    assert hz.size(n) == text


def test_count_percent_duration() -> None:
    assert hz.count(1234567) == "1,234,567" and hz.count(12.6) == "13" and hz.count(None) == "-"
    assert hz.percent(0.0526) == "5.3%"
    assert hz.percent(1.0) == "100.0%" and hz.percent(0) == "0.0%" and hz.percent(0.05, 0) == "5%"
    assert hz.percent(0.000012) == "0.0012%"  # a tiny rate never reads as 0
    assert hz.duration(0.85) == "850 ms"
    assert hz.duration(12.34) == "12.3 s"
    assert hz.duration(270) == "4.5 min"
    assert hz.duration(7560) == "2.1 h"
    assert hz.duration(3 * 86400) == "3.0 d"
    assert hz.milliseconds(27.12) == "27.12 ms" and hz.milliseconds(0.016) == "0.016 ms"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (268435456.0, "268,435,456"),
        (2.68435e8, "268,435,000"),
        (3.14159, "3.142"),
        (0.0042, "0.0042"),
        (0.12345, "0.1235"),
        (12.5, "12.5"),
        (1234.5, "1,234"),
        (0.00001, "<0.0001"),
        (-2.5, "-2.5"),
        (True, "true"),
        (math.inf, "inf"),
        (None, "-"),
    ],
)
def test_number_never_uses_exponents(value: float | None, text: str) -> None:
    assert hz.number(value) == text
    assert "e+" not in hz.number(value) and "e-" not in hz.number(value)


def test_metric_picks_the_unit_from_the_name() -> None:
    assert hz.metric("model_bytes", 268435456) == "268 MB"
    assert hz.metric("host_latency_p50_ms", 27.1) == "27.1 ms"
    assert hz.metric("error_rate", 0.25) == "25.0%"
    assert hz.metric("soak_seconds", 600) == "10.0 min"
    assert hz.metric("requests", 12000) == "12,000"
    assert hz.metric("accuracy", 0.98765) == "0.9877"


def test_timestamp() -> None:
    assert hz.timestamp("2026-12-07T08:34:53.123456+00:00") == "2026-12-07 08:34:53Z"
    assert hz.timestamp("2026-12-07T10:34:53+02:00") == "2026-12-07 10:34:53+02:00"
    assert hz.timestamp(None) == "-" and hz.timestamp("not a time") == "not a time"
