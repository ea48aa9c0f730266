"""The tables of ``bench/README.md``'s scale section, printed from ``bench/results/scale.json``.

``python -m bench.scale_table [PATH]`` prints two Markdown tables: the rollout runs (emulated devices and real
agents) and the idle runs. Every figure is read from the file; nothing is computed here but rounding, the
devices per minute and the ratio to AWS IoT Jobs' documented ceiling (1,000 devices per minute) where a run
did not record them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
AWS_IOT_JOBS_PER_MINUTE = 1000.0


def _n(value: Any, unit: str = "", digits: int = 1, missing: str = "not reached") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value)


def _rss(run: dict[str, Any], key: str = "peak_rss_mb") -> str:
    rss = run.get(key) or {}
    return " / ".join("-" if rss.get(k) is None else f"{rss[k]:,.0f}" for k in ("server", "broker", "devices"))


def _per_minute(run: dict[str, Any]) -> str:
    took = run.get("seconds_to_all_committed")
    if not took:
        return "-"
    per_minute = run.get("devices_per_minute") or run["devices"] / took * 60
    return f"{per_minute:,.0f} ({per_minute / AWS_IOT_JOBS_PER_MINUTE:.1f}x)"


def rollout_rows(runs: list[dict[str, Any]]) -> list[str]:
    head = (
        "| devices | devices are | ingest processes | committed | all committed | per minute (x AWS IoT Jobs) "
        "| halt -> all back | telemetry sent / stored / doubled | peak RSS server / broker / devices (MB) | max load |"
    )
    rows = [head, "|" + "---|" * 10]
    for run in runs:
        if run.get("mode") == "idle":
            continue
        kind = "emulated" if run.get("emulated") else "real agents"
        telemetry = f"{_n(run.get('telemetry_sent'))} / {_n(run.get('telemetry_stored'))} / "
        telemetry += _n(run.get("telemetry_doubled"))
        if "telemetry_sent" not in run:
            telemetry = "not run"
        halt = run.get("seconds_halt_to_all_reverted")
        halt_text = _n(halt, " s") if halt is not None else f"not reached ({_n(run.get('reverted'))} back)"
        if "seconds_halt_to_all_reverted" not in run:
            halt_text = "not run"
        if run.get("error"):  # a phase broke: the run stopped there (its entry says why)
            halt_text += " (stopped: see `error`)"
        rows.append(
            f"| {run['devices']:,} | {kind} | {run.get('ingest_processes', 0)} | {_n(run.get('committed'))} "
            f"| {_n(run.get('seconds_to_all_committed'), ' s')} | {_per_minute(run)} | {halt_text} | {telemetry} "
            f"| {_rss(run)} | {_n(run.get('max_load_1min'), '', 1, '-')} |"
        )
    return rows


def idle_rows(runs: list[dict[str, Any]]) -> list[str]:
    head = (
        "| devices | brokers | ingest processes | connected | check-ins sent / acked | CPU cores server / brokers / "
        "devices | steady RSS server / brokers / devices (MB) | max load |"
    )
    rows = [head, "|" + "---|" * 8]
    for run in runs:
        if run.get("mode") != "idle":
            continue
        idle = run.get("idle") or {}
        cpu = idle.get("cpu_cores") or {}
        rss = idle.get("rss_mb_steady") or {}
        checkins = idle.get("checkins") or {}
        edges = len((run.get("brokers") or {}).get("edges") or [])
        rows.append(
            f"| {run['devices']:,} | 1 core + {edges} edge | {run.get('ingest_processes', 0)} "
            f"| {_n(idle.get('connected_at_end'))} | {_n(checkins.get('sent'))} / {_n(checkins.get('acked_by_server'))} "
            f"| {_n(cpu.get('server'), '', 2)} / {_n(cpu.get('brokers_total'), '', 2)} / {_n(cpu.get('devices'), '', 2)} "
            f"| {_n(rss.get('server'), '', 0)} / {_n(rss.get('brokers_total'), '', 0)} / {_n(rss.get('devices'), '', 0)} "
            f"| {_n(run.get('max_load_1min'), '', 1, '-')} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(runs, list):
        print(f"error: {path} is not a list of runs", file=sys.stderr)
        return 2
    print("\n".join(rollout_rows(runs)))
    print()
    print("\n".join(idle_rows(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
