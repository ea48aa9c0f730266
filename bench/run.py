"""`make bench`: run every benchmark module present and collect their JSON in bench/results/.

Each benchmark module exposes ``run(results_dir: Path, quick: bool) -> dict`` and measures its
figures beside a baseline taken in the same run. Performance goals are reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = (
    "bench.packager_bench",
    "bench.mixed_precision_bench",
    "bench.agent_bench",
    "bench.serving_bench",
    "bench.server_bench",
    "bench.telemetry_bench",
    "bench.drift_bench",
    "bench.fleet_bench",
    "bench.dashboard_bench",
)
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only", action="append", default=[], help="run only benchmarks whose module name contains this"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {
        "started_at": datetime.now(UTC).isoformat(),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "benchmarks": {},
    }
    failed = 0
    for name in BENCHMARKS:
        if args.only and not any(o in name for o in args.only):
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                print(f"{name}: not written yet, skipped")
                continue
            raise
        print(f"== {name}")
        start = time.perf_counter()
        try:
            result = module.run(RESULTS, args.quick)
            status = "ok"
        except Exception:  # a broken benchmark must not hide the others' figures
            traceback.print_exc()
            result, status = {}, "error"
            failed += 1
        summary["benchmarks"][name] = {  # type: ignore[index]
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
            "result": result,
        }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {RESULTS / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
