"""The CLI's one table renderer at 80 columns, and the rollout status view (gates, failures, --watch exit codes)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, RenderableType

from edgeota_contract import tables as tb
from ota_server import cli_rollouts
from ota_server.api.responses import RolloutStatus


def render(parts: list[RenderableType], width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    tb.print_renderables(console, parts)
    return console.export_text()


def assert_fits(text: str, width: int = 80) -> None:
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width


def test_long_cells_fold_within_80_columns_and_keep_every_character() -> None:
    long_id = "dev-" + "0123456789abcdef" * 4
    labels = ", ".join(f"site{i}=warehouse-north-{i}" for i in range(6))
    text = render([tb.table(["device", "profile", "labels"], [(long_id, "x86-avx512-vnni", labels)], title="t")])
    assert_fits(text)
    assert "…" not in text  # folded, never cut
    narrow = render([tb.table(["device"], [(long_id,)])], width=20)
    assert_fits(narrow, 20)
    assert long_id in "".join(line.strip() for line in narrow.splitlines()[2:])  # every character kept


def test_cells_are_text_not_markup() -> None:
    text = render([tb.table(["device"], [("[bold red]cam[/]",)])])
    assert "[bold red]cam[/]" in text


def test_kv_sections_align_keys() -> None:
    text = render([tb.kv([("state", "running"), ("release", "r1")], title="rollout x")])
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].strip() == "rollout x"
    assert lines[1].index("running") == lines[2].index("r1")  # values start in one column


def _status(**extra: Any) -> RolloutStatus:
    data: dict[str, Any] = {
        "rollout_id": "9ff35875e19f432a837684264ac3030e",
        "release_id": "97d0c0ffee97d0c0ffee97d0c0ffee12",
        "model_name": "digits",
        "version": "1.0.0",
        "state": "running",
        "reason": "ok",
        "detail": "",
        "current_stage": 0,
        "stage_count": 2,
        "stage_sizes": [1, 30],
        "plan": {"gates": {"min_devices": 1, "max_failure_rate": 0.1, "min_count_for_failure_rate": 5}},
        "selector": {},
        "targets": 30,
        "no_bundle_for_profile": [],
        "skipped_rolled_back_before": [],
        "counts": {"notified": 20, "committed": 8, "failed": 2},
        "rollback_counts": {},
        "retries": {"retried_attempts": 0, "waiting": 0},
        "created_at": "2026-12-07T08:30:00+00:00",
        "updated_at": "2026-12-07T08:31:00+00:00",
        "created_by": "token:ops",
        "start_at": None,
        "gates": [
            {"name": "error_rate", "state": "not_evaluated", "value": None, "threshold": 0.01, "have": 120,
             "need": 1000, "unit": "requests", "detail": "waiting for data"},
            {"name": "p95_latency_ratio", "state": "passed", "value": 1.04, "threshold": 1.5, "have": 5000,
             "need": 1000, "unit": "requests", "detail": ""},
        ],
        "failures": {"total": 0, "by_reason": {}, "devices": []},
    }  # fmt: skip
    data.update(extra)
    return RolloutStatus.model_validate(data)


def test_gate_rows_say_passed_failed_or_not_evaluated_n_of_m() -> None:
    rows = {r[0]: r for r in cli_rollouts.gate_rows(_status())}
    assert rows["failure rate"][1] == "failed" and rows["failure rate"][2] == "20.0%"  # 2 of 10 over 10%
    assert rows["min devices"][1] == "passed"
    assert rows["error_rate"][1] == "not evaluated" and rows["error_rate"][4] == "120 of 1,000 requests"
    assert rows["p95_latency_ratio"][1] == "passed" and rows["p95_latency_ratio"][2] == "1.04"
    early = {r[0]: r for r in cli_rollouts.gate_rows(_status(counts={"notified": 29, "committed": 1}))}
    assert early["failure rate"][1] == "not evaluated" and early["failure rate"][4] == "1 of 5 finished"
    halted = {r[0]: r for r in cli_rollouts.gate_rows(_status(counts={"committed": 0}, halted_by="min_devices"))}
    assert halted["min devices"][1] == "failed"


def test_status_view_bounds_failed_devices_and_fits() -> None:
    devices = [
        {"device_id": f"cam-{i:03d}", "state": "failed", "reason": "download_failed", "detail": "HTTP 404 " * 6}
        for i in range(10)
    ]
    failures = {"total": 1234, "by_reason": {"download_failed": 1200, "smoke_test_failed": 34}, "devices": devices}
    text = render(cli_rollouts.rollout_view(_status(failures=failures)))
    assert_fits(text)
    assert "download_failed 1,200" in text and "smoke_test_failed 34" in text
    assert "cam-009" in text and "and 1,224 more" in text
    assert "rollout 9ff35875e19f432a837684264ac3030e" in text


def test_watch_exit_codes() -> None:
    assert cli_rollouts.watch_exit_code(_status(state="completed")) == 0
    assert cli_rollouts.watch_exit_code(_status(state="rolled_back")) == 3
    assert cli_rollouts.watch_exit_code(_status(state="aborted")) == 4
    failed = {"total": 1, "by_reason": {"smoke_test_failed": 1}, "devices": []}
    assert cli_rollouts.watch_exit_code(_status(state="completed", failures=failed)) == 5
