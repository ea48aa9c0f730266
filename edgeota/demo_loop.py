"""``edgeota demo --loop``: drift on one cohort, back to a stable fleet through retraining, with no hand step.

The story, on the stack :func:`edgeota.demo.run_demo` started (alert rules from :func:`loop_server_env`):
a fleet of two cohorts (device label ``cohort=north`` / ``south``, three devices per hardware profile in each;
one profile with ``quick``) serves digits 1.1.0 on natural digits inputs; every device keeps a uniform sample of
its raw inputs, and north's
application reports the true digit of each prediction (feedback). North's drift verdict is stable. Then a
sensor fault shifts a band of pixels on north: the drift alert fires and names the features; an export of
north's data since the fault is written (trigger ``alert:<id>``); the digits model is retrained on it plus
the original training data (:mod:`packager.examples.retrain_digits`) and packaged as 2.0.0; 2.0.0 is
evaluated against 1.1.0 on a second export (rows collected after the first, so never trained on) and the
record uploaded; the blessed 2.0.0 goes out to north in a gated rollout (a canary judged by the drift gate,
then a stage that needs approval, granted by the demo with ``--approve``); north's drift verdict on 2.0.0
is stable and its feedback accuracy is back.

Guarantees: :func:`run_loop` returns True only when every step happened as told; otherwise it prints
``step N/M failed (what the step does): what was seen`` and returns False. Either way it writes what it saw to
``<workdir>/loop/summary.json``. The fleets it starts stop on return, on an
error and on Ctrl-C. Step helpers live in :mod:`edgeota.demo_loop_steps`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from edgeota.demo_loop_steps import (
    COHORT_LABEL,
    FAULT,
    MODEL,
    SHIFTED,
    LoopStepError,
    accuracy_on,
    count_labelled,
    evaluate_candidate,
    export_when,
    features_in,
    gated_rollout,
    wait_alerts,
    wait_online,
    wait_verdict,
)
from edgeota.fleet.simulator import FleetConfig, FleetSimulator
from edgeota.fleet.stack import Stack
from edgeota_contract.errors import EdgeotaError
from ota_server.client import ApiClient
from ota_server.client_plans import RolloutPlan, StagePlan

BASE_VERSION = "1.1.0"
RETRAINED_VERSION = "2.0.0"
RULE = "digits-input-drift"
TRAIN_ROWS = 300  # labelled north rows to retrain on (on top of the 1,347 original training images)
EVAL_ROWS = 250  # labelled rows of the second export: above the blessing's min_rows (200)
# Steps narrated by run_loop (plus one more when it trains the serving release itself).
STEPS = 9


class Narration(Protocol):
    n: int  # the number of the step under way
    total: int

    def step(self, text: str) -> float: ...

    def done(self, started: float, text: str) -> None: ...


@dataclass(frozen=True)
class LoopOptions:
    profiles: tuple[str, ...]
    quick: bool = False
    approve: bool = False
    keep_running: bool = False


@dataclass
class Checkpoints:
    """What the loop saw, for the summary table and the verdict."""

    verdicts: dict[str, str] = field(default_factory=dict)  # moment -> north's overall drift level
    accuracy: dict[str, tuple[int, int]] = field(default_factory=dict)  # moment -> (correct, labelled) on north
    features: list[str] = field(default_factory=list)
    step: str = "?"  # the step under way, for the failure message
    title: str = ""
    record: dict[str, Any] = field(default_factory=dict)  # written to loop/summary.json

    def begin(self, say: Narration, text: str) -> float:
        started = say.step(text)
        self.step, self.title = f"{say.n}/{say.total}", text if len(text) <= 70 else text[:67] + "..."
        return started


def loop_server_env(workdir: Path) -> dict[str, str]:
    """Server settings for the loop: the drift alert rule (written to ``workdir/alerts.toml``), alert rounds every
    2 s and 60 s telemetry buckets (the smallest), so a demo's minutes are enough."""
    rules = workdir / "alerts.toml"
    rules.write_text(
        "# Written by `edgeota demo --loop`: drift (inputs and outputs) on each release x profile x cohort of digits.\n"
        "[[rules]]\n"
        f'name = "{RULE}"\nkind = "drift"\nmodel = "{MODEL}"\n'
        'window = "2m"\nmin_count = 200\ncooldown = "30m"\nseverity = "warning"\n',
        encoding="utf-8",
    )
    return {
        "EDGEOTA_SERVER_ALERT_RULES_FILE": str(rules),
        "EDGEOTA_SERVER_ALERT_EVAL_SECONDS": "2",
        "EDGEOTA_SERVER_TELEMETRY_BUCKET_SECONDS": "60",
    }


def run_loop(opts: LoopOptions, stack: Stack, say: Narration, console: Console) -> bool:
    """Run the loop on ``stack``; see the module docstring. False (with the failed step printed) on any failure."""
    from packager.examples.retrain_digits import RetrainError

    if opts.quick:  # one hardware profile: three devices per cohort on it reach each verdict three times as fast
        opts = replace(opts, profiles=opts.profiles[:1])
    seen = Checkpoints()
    ok = False
    try:
        with ApiClient.connect(stack.server_url, stack.admin_token) as api:
            ok = _loop(opts, stack, api, say, console, seen)
    except (EdgeotaError, RetrainError) as exc:  # LoopStepError, and the API's, packager's and retrainer's errors
        seen.record["failed"] = {"step": seen.step, "title": seen.title, "error": str(exc)}
        console.print(f"[bold red]step {seen.step} failed[/] ({seen.title}): {exc}")
        console.print("[bold red]the loop did not go as expected[/]")
    finally:
        _write_record(stack.workdir / "loop" / "summary.json", seen, ok)
    return ok


def _write_record(path: Path, seen: Checkpoints, ok: bool) -> None:
    record = {
        "ok": ok,
        "shifted_features": list(SHIFTED),
        "verdicts": seen.verdicts,
        "accuracy": {k: {"correct": c, "labelled": n} for k, (c, n) in seen.accuracy.items()},
        **seen.record,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def _fleet(opts: LoopOptions, stack: Stack, cohort: str, feedback: float) -> FleetConfig:
    return FleetConfig(
        devices=3 * len(opts.profiles),
        profiles=opts.profiles,
        server_url=stack.server_url,
        admin_token=stack.admin_token,
        workdir=stack.workdir / "loop-fleet",
        rate_per_device=6.0 if opts.quick else 5.0,
        seed=1 if cohort == "north" else 2,
        prefix=f"loop-{cohort}",
        labels={"fleet": "loop", COHORT_LABEL: cohort},
        input_source="digits",
        feedback_share=feedback,
        agent_overrides={
            # Every request's inputs feed the drift histograms (default 1/16), so verdicts come within seconds.
            "telemetry_feature_sample_rate": 1.0,
            # The uniform stream of raw inputs for retraining: a larger share where labels come back.
            "sample_rate": 0.5 if cohort == "north" else 0.1,
            **({"trial_seconds": 3.0, "trial_requests": 15} if opts.quick else {}),
        },
    )


def _loop(opts: LoopOptions, stack: Stack, api: ApiClient, say: Narration, console: Console, seen: Checkpoints) -> bool:
    from packager.examples.retrain_digits import retrain_from_export

    base_id = _serving_release(opts, stack, api, say, seen)
    t = seen.begin(
        say,
        "Loop: two cohorts (label cohort=north / south) serving digits 1.1.0 on natural digits images; every device"
        " keeps a uniform sample of its inputs for retraining (north half, south a tenth), north's application"
        " reports the true digit",
    )
    north_cfg, south_cfg = _fleet(opts, stack, "north", 1.0), _fleet(opts, stack, "south", 0.0)
    with FleetSimulator(north_cfg) as north, FleetSimulator(south_cfg) as south:
        for sim in (north, south):
            sim.provision()
            sim.start()
        total = north_cfg.devices + south_cfg.devices
        wait_online(api, total)
        plan = RolloutPlan(stages=[StagePlan(percent=100)], labels={"fleet": "loop"}, device_timeout_seconds=90.0)
        rollout = api.create_rollout(base_id, plan, start=True)
        final = api.wait_rollout(rollout.rollout_id, timeout=120, deployments=False)
        if final.state != "completed":
            raise LoopStepError(f"installing {BASE_VERSION} ended {final.state}: {final.detail}")
        say.done(t, f"{total} devices serve {BASE_VERSION} ({north_cfg.devices} north, {south_cfg.devices} south)")

        t = seen.begin(
            say, "North before any fault: drift verdict and accuracy from the server's telemetry and feedback"
        )
        seen.verdicts["before the fault (1.1.0)"] = wait_verdict(api, BASE_VERSION, opts.profiles, "stable")
        seen.accuracy["before the fault (1.1.0)"] = accuracy_on(api, BASE_VERSION, None)
        say.done(t, f"stable on every profile; accuracy {_fmt(seen.accuracy['before the fault (1.1.0)'])}")

        t = seen.begin(
            say,
            f"Sensor fault on north: pixels {SHIFTED[0]}-{SHIFTED[-1]} (rows 2-3 of each image) read"
            f" {FAULT.shift} standard deviations high; waiting for the drift alert",
        )
        fault_at = datetime.now(UTC)
        north.set_drift(FAULT)
        alerts = wait_alerts(api, RULE, BASE_VERSION, "north")
        seen.features = list(dict.fromkeys(f for a in alerts for f in a.features))  # worst first, per alert
        seen.record["alerts"] = [a.model_dump(include={"id", "rule", "scope", "features", "summary"}) for a in alerts]
        shifted = features_in(seen.features, SHIFTED)
        if not shifted:
            raise LoopStepError(f"the alert named {seen.features}, none of the shifted pixels")
        for alert in alerts:
            console.print(f"      alert {alert.id[:12]} ({alert.severity}): {alert.summary}")
        unshifted = [f for f in seen.features if f not in shifted and "[" in f]
        outputs = [f for f in seen.features if "[" not in f]
        also = f"; the model's outputs moved too: {', '.join(outputs)}" if outputs else ""
        also += f"; also named, though not shifted: {', '.join(unshifted)}" if unshifted else ""
        say.done(t, f"the alerts name the shifted pixels {', '.join(shifted)}{also}")
        # Samples reach the server seconds after they are taken, so the export (a window on arrival) also holds
        # rows served before the fault: what counts and what is trained on are the rows served since it.
        since = fault_at

        t = seen.begin(say, f"Exporting north's samples since the fault (trigger alert:{alerts[0].id[:12]}...)")
        train_dir = stack.workdir / "loop" / "export-train"
        drift_report = alerts[0].details.get("drift_report")
        trigger = f"alert:{alerts[0].id}"
        manifest, cut = export_when(api, train_dir, since, trigger, base_id, drift_report, TRAIN_ROWS, since)
        labelled = count_labelled(train_dir, since)
        seen.record["export"] = {
            "path": str(train_dir),
            "trigger": manifest.trigger,
            "digest": manifest.digest.get("value"),
            "rows": manifest.counts.get("rows"),
            "labelled_north_rows_since_fault": labelled,
            "fault_at": fault_at.isoformat(),
        }
        seen.verdicts["under the fault (1.1.0)"] = wait_verdict(api, BASE_VERSION, opts.profiles, "drift", since)
        seen.accuracy["under the fault (1.1.0)"] = accuracy_on(api, BASE_VERSION, since)
        say.done(
            t,
            f"{train_dir}: {manifest.counts.get('rows')} rows (Parquet by release and cohort; {labelled} rows north"
            f" served since the fault, labelled through feedback), trigger {manifest.trigger[:18]}..., digest"
            f" {manifest.digest.get('value', '')[:12]}",
        )

        t = seen.begin(say, "Retraining the digits model on the export plus the original training data")
        retrained = retrain_from_export(train_dir, stack.workdir / "loop" / "retrained", cohort="north", since=since)
        seen.record["retrain"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(retrained).items()}
        say.done(
            t,
            f"{retrained.labelled_rows} exported + {retrained.original_rows} original rows; accuracy"
            f" {_fmt_f(retrained.accuracy_on_exported)} on held-out exported rows,"
            f" {retrained.accuracy_on_original:.3f} on the original evaluation split",
        )

        t = seen.begin(
            say, f"Packaging {RETRAINED_VERSION} for {_profiles(opts)} (every packager gate) and publishing it"
        )
        candidate_id, recipes = _package(opts, stack, api, retrained)
        seen.record["candidate_release_id"] = candidate_id
        say.done(t, f"release {candidate_id}: {recipes}")

        t = seen.begin(
            say, f"Evaluating {RETRAINED_VERSION} against {BASE_VERSION} on a second export (collected after the first)"
        )
        eval_dir = stack.workdir / "loop" / "export-eval"
        export_when(api, eval_dir, cut, trigger, base_id, drift_report, EVAL_ROWS)
        stored = evaluate_candidate(api, stack, candidate_id, base_id, eval_dir)
        overall = stored.record.verdict.slices[0] if stored.record.verdict else None
        seen.record["evaluation"] = {
            "id": stored.evaluation_id,
            "blessed": stored.blessed,
            "dataset_digest": stored.dataset_digest,
            "overall": overall.model_dump() if overall else None,
        }
        if not stored.blessed:
            raise LoopStepError(f"{RETRAINED_VERSION} not blessed: {stored.record.verdict}")
        say.done(
            t,
            f"BLESSED (evaluation {stored.evaluation_id[:12]}): {overall.rows if overall else '?'} labelled rows,"
            f" accuracy {_fmt_f(overall.baseline_accuracy if overall else None)} ->"
            f" {_fmt_f(overall.candidate_accuracy if overall else None)}",
        )

        how = "the demo grants it: --approve" if opts.approve else "an operator grants it"
        t = seen.begin(
            say,
            f"Gated rollout of {RETRAINED_VERSION} to cohort=north: a canary judged by the drift gate, then a stage"
            f" that needs approval ({how})",
        )
        final = gated_rollout(api, candidate_id, opts.approve, console, stack)
        north_serving, south_serving = north.snapshot().versions, south.snapshot().versions
        seen.record["rollout"] = final.model_dump(
            include={"rollout_id", "state", "detail", "selector", "targets", "counts", "gates"}
        ) | {"north_serving": north_serving, "south_serving": south_serving}
        if north_serving.get(RETRAINED_VERSION, 0) != north_cfg.devices:
            raise LoopStepError(f"north serves {north_serving} after the rollout, not {RETRAINED_VERSION} everywhere")
        say.done(
            t,
            f"rollout {final.state}: {final.detail}; north serves {RETRAINED_VERSION} on all {north_cfg.devices}"
            f" devices, south still {', '.join(sorted(south_serving))}",
        )

        t = seen.begin(say, f"North on {RETRAINED_VERSION}: drift verdict and accuracy")
        seen.verdicts["after the rollout (2.0.0)"] = wait_verdict(api, RETRAINED_VERSION, opts.profiles, "stable")
        seen.accuracy["after the rollout (2.0.0)"] = accuracy_on(api, RETRAINED_VERSION, None)
        say.done(t, f"stable again; accuracy {_fmt(seen.accuracy['after the rollout (2.0.0)'])}")
        ok = _summary(console, seen)
        if ok and opts.keep_running:
            console.print(f"\nKeeping everything up. Server {stack.server_url}, admin token {stack.admin_token}")
            console.print("Ctrl-C stops the fleet, the server and the broker.")
            while True:
                time.sleep(1)
        return ok


def _serving_release(opts: LoopOptions, stack: Stack, api: ApiClient, say: Narration, seen: Checkpoints) -> str:
    """The id of digits 1.1.0: published by the rollout story, else trained, packaged and published here."""
    existing = [r for r in api.releases(MODEL) if r.version == BASE_VERSION]
    if existing:
        return existing[0].release_id
    from edgeota.fleet.releases import package_release
    from packager.examples.digits import build_digits_example

    t = seen.begin(say, f"Training the tiny digits model and packaging {BASE_VERSION} for {_profiles(opts)}")
    model = build_digits_example(stack.workdir / "models" / f"v{BASE_VERSION}", arch="mlp", seed=0, epochs=300)
    rel = package_release(
        model.model_path,
        model.calibration_path,
        model.eval_path,
        opts.profiles,
        stack.release_key,
        stack.workdir / "bundles" / f"v{BASE_VERSION}",
        MODEL,
        BASE_VERSION,
    )
    ids = {api.upload(path).release_id for path in rel.bundles.values()}
    say.done(t, f"{BASE_VERSION} (accuracy {model.fp32_accuracy:.3f}) published")
    return ids.pop()


def _package(opts: LoopOptions, stack: Stack, api: ApiClient, retrained: Any) -> tuple[str, str]:
    from edgeota.fleet.releases import package_release

    rel = package_release(
        retrained.model_path,
        retrained.calibration_path,
        retrained.eval_path,
        opts.profiles,
        stack.release_key,
        stack.workdir / "bundles" / f"v{RETRAINED_VERSION}",
        MODEL,
        RETRAINED_VERSION,
    )
    ids = {api.upload(path).release_id for path in rel.bundles.values()}
    return ids.pop(), ", ".join(f"{p}: {r}" for p, r in rel.recipes.items())


def _profiles(opts: LoopOptions) -> str:
    return ", ".join(opts.profiles) if len(opts.profiles) < 3 else f"{len(opts.profiles)} profiles"


def _fmt(acc: tuple[int, int]) -> str:
    correct, labelled = acc
    return f"{correct / labelled:.3f} ({labelled} labels)" if labelled else "- (no labels)"


def _fmt_f(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary(console: Console, seen: Checkpoints) -> bool:
    table = Table(title="Cohort north through the loop", title_justify="left")
    for col in ("moment", "drift verdict", "accuracy (feedback)"):
        table.add_column(col)
    for moment, level in seen.verdicts.items():
        table.add_row(moment, level, _fmt(seen.accuracy.get(moment, (0, 0))))
    console.print()
    console.print(table)
    before = seen.accuracy.get("under the fault (1.1.0)", (0, 0))
    after = seen.accuracy.get("after the rollout (2.0.0)", (0, 0))
    ok = seen.verdicts.get("after the rollout (2.0.0)") == "stable" and bool(after[1]) and bool(before[1])
    if ok and after[0] / after[1] <= before[0] / before[1]:
        console.print("[bold red]accuracy on north did not improve after the rollout[/]")
        ok = False
    console.print("[bold green]loop finished as expected[/]" if ok else "[bold red]the loop did not go as expected[/]")
    return ok
