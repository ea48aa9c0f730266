"""``edgeota demo``: the whole loop on one machine, from a trained model to a bad release reversed.

Steps: start a broker and the OTA server (SQLite, local artifact store) under ``--workdir``; create
a release key; train the tiny digits model twice (v1, v2) and package each for three hardware
profiles; derive a deliberately slow v3; provision simulated devices running the real agent;
roll out v1, then v2, in canary stages to completion; roll out v3 and watch the canary devices'
trial windows fail, the rollout's failure gate fire and the rollout roll back on its own. With ``loop``
(``--loop``, or alone with ``--loop-only``), then the retraining loop of :mod:`edgeota.demo_loop`.

Guarantees: every process the demo starts (broker, server) is stopped on return, on an error
and on Ctrl-C/SIGTERM (see :mod:`edgeota.procs`); agents run as threads of this process.
:func:`run_demo` returns True when every step behaved as the story says (v1 and v2 completed on
every device, v3 rolled back with every device back on v2), False otherwise.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeota import demo_loop
from edgeota.broker import BrokerPreference
from edgeota.fleet.simulator import FleetConfig, FleetSimulator
from edgeota.fleet.stack import Stack, local_stack, prepare_workdir
from edgeota.procs import signals_raise
from ota_server.api.responses import RolloutStatus
from ota_server.client import ApiClient, ApiClientError
from ota_server.client_plans import RolloutPlan, StagePlan

# Three device classes whose latency budgets (30-100 ms) leave room for a fleet simulated on a laptop's cores.
PROFILES = ("rpi4", "rpi5", "imx8mp-npu")
MODEL = "digits"
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")


@dataclass(frozen=True)
class DemoOptions:
    devices: int = 50
    quick: bool = False
    keep_running: bool = False
    workdir: Path = Path(".demo")
    broker: BrokerPreference = "auto"
    profiles: tuple[str, ...] = PROFILES
    rollouts: bool = True  # the rollout story (v1, v2, the bad v3)
    loop: bool = False  # the retraining loop (edgeota.demo_loop), after the rollout story when both run
    approve: bool = False  # the loop's approval stage is granted by the demo itself


@dataclass
class RolloutOutcome:
    version: str
    rollout_id: str
    state: str
    reason: str | None
    detail: str | None
    seconds: float
    stages_reached: int
    stage_count: int
    counts: dict[str, int]
    gate_seconds: float | None = None  # v3: rollout start -> halted
    all_back_seconds: float | None = None  # v3: rollout start -> every device serving the previous version
    served_devices: int = 0  # devices that answered live requests with this version
    served_requests: int = 0
    device_reasons: dict[str, int] = field(default_factory=dict)


class Narrator:
    """Numbered steps with timings, for a reader who has never seen edgeota."""

    def __init__(self, console: Console, total: int) -> None:
        self.console, self.total, self.n = console, total, 0
        self.t0 = time.monotonic()

    def step(self, text: str) -> float:
        self.n += 1
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {text}")
        self.console.file.flush()  # show progress at once even when stdout is a file or a pipe
        return time.monotonic()

    def done(self, started: float, text: str) -> None:
        self.console.print(f"      [green]ok[/] {text} [dim]({time.monotonic() - started:.1f}s)[/]")
        self.console.file.flush()


def run_demo(opts: DemoOptions, console: Console | None = None) -> bool:
    """Run the demo; see the module docstring. Raises EdgeotaError subclasses for broken set-ups."""
    # Bind stdout now: a library that swaps sys.stdout from several threads may not put it back.
    console = console or Console(file=sys.stdout)
    logging.getLogger().setLevel(logging.ERROR)  # the agents' own logs would drown the story
    workdir = prepare_workdir(opts.workdir)
    total = 1 + (6 if opts.rollouts else 0) + (demo_loop.STEPS + (0 if opts.rollouts else 1) if opts.loop else 0)
    say = Narrator(console, total)
    fleet = f"{opts.devices} simulated devices" if opts.rollouts else "the loop's simulated devices"
    console.print(f"[bold]edgeota demo[/]: {fleet}, work folder {workdir}\n")
    env = demo_loop.loop_server_env(workdir) if opts.loop else None
    with signals_raise():
        t = say.step("Starting an MQTT broker and the OTA server (SQLite, local artifact store)")
        with local_stack(workdir, opts.broker, server_env_extra=env) as stack:
            say.done(t, f"{stack.broker.kind} on {stack.broker.host}:{stack.broker.port}, server at {stack.server_url}")
            ok = _story(opts, stack, say, console) if opts.rollouts else True
            if opts.loop:
                if opts.rollouts:
                    console.print()
                loop_opts = demo_loop.LoopOptions(opts.profiles, opts.quick, opts.approve, opts.keep_running)
                ok = demo_loop.run_loop(loop_opts, stack, say, console) and ok
                console.print(
                    "[bold green]demo finished as expected[/]" if ok else "[bold red]demo did not go as expected[/]"
                )
            return ok


def _story(opts: DemoOptions, stack: Stack, say: Narrator, console: Console) -> bool:
    from edgeota.fleet.releases import make_bad_release

    releases = _build_releases(opts, stack, say)
    bad = make_bad_release(releases[-1], stack.release_key, stack.workdir / "bundles" / "v3", VERSIONS[2])
    console.print(
        f"      [yellow]and a bad {VERSIONS[2]}[/]: the {VERSIONS[1]} model with a useless branch that makes it"
        " ~30 ms per request instead of ~0.05 ms (same answers; signed without the packager's latency gate)"
    )
    releases.append(bad)

    t = say.step("Publishing the three releases (the server verifies every signature on upload)")
    release_ids: list[str] = []
    with ApiClient.connect(stack.server_url, stack.admin_token) as api:
        for rel in releases:
            ids = {api.upload(path).release_id for path in rel.bundles.values()}
            release_ids.append(ids.pop())
        say.done(t, f"{sum(len(r.bundles) for r in releases)} bundles in {len(releases)} releases")

        t = say.step(f"Provisioning {opts.devices} simulated devices across {', '.join(opts.profiles)}")
        fleet = FleetConfig(
            devices=opts.devices,
            profiles=opts.profiles,
            server_url=stack.server_url,
            admin_token=stack.admin_token,
            workdir=stack.workdir / "fleet",
            rate_per_device=2.0 if opts.quick else 3.0,
            prefix="demo",
            agent_overrides={"trial_seconds": 3.0, "trial_requests": 15} if opts.quick else {},
            # Natural inputs (the digits images), not the bundle's handful of test vectors: the same traffic the
            # reference statistics describe, so drift verdicts and alert rules see an undrifted fleet.
            input_source="digits",
        )
        with FleetSimulator(fleet) as sim:
            sim.provision()
            sim.start()
            _wait_online(api, opts.devices, timeout=60)
            say.done(t, f"{opts.devices} agents online, each with its own identity, folder and MQTT session")

            outcomes = []
            for index, (rel, release_id) in enumerate(zip(releases, release_ids, strict=True)):
                label = ["rolling out v1 (first install)", "rolling out v2", "rolling out the bad v3"][index]
                t = say.step(f"Canary rollout of {MODEL} {rel.version}: {label}")
                outcome = _rollout(api, sim, release_id, rel.version, _plan(opts), console, opts.quick)
                outcomes.append(outcome)
                say.done(t, f"rollout {outcome.state} ({outcome.reason or 'ok'})")
            ok = _summary(console, opts, stack, sim, outcomes)
            if opts.keep_running and not opts.loop:  # with the loop, the loop's fleet is kept running instead
                _keep_running(console, stack)
            return ok


def _build_releases(opts: DemoOptions, stack: Stack, say: Narrator) -> list[Any]:
    from edgeota.fleet.releases import package_release
    from packager.examples.digits import build_digits_example

    t = say.step(f"Training the tiny digits model twice and packaging each for {len(opts.profiles)} profiles")
    out = []
    for epochs, version in ((30, VERSIONS[0]), (300, VERSIONS[1])):  # v2: the same data, trained for longer
        model = build_digits_example(stack.workdir / "models" / f"v{version}", arch="mlp", seed=0, epochs=epochs)
        rel = package_release(
            model.model_path,
            model.calibration_path,
            model.eval_path,
            opts.profiles,
            stack.release_key,
            stack.workdir / "bundles" / f"v{version}",
            MODEL,
            version,
        )
        recipes = ", ".join(f"{p}: {r}" for p, r in rel.recipes.items())
        say.done(t, f"{version} (accuracy {model.fp32_accuracy:.3f}) -> {recipes}")
        out.append(rel)
    return out


def _plan(opts: DemoOptions) -> RolloutPlan:
    canary = max(2, round(opts.devices * 0.1))
    soak = 1.0 if opts.quick else 3.0
    return RolloutPlan(
        stages=[
            StagePlan(count=canary, soak_seconds=soak),
            StagePlan(percent=50, soak_seconds=soak),
            StagePlan(percent=100),
        ],
        max_failure_rate=0.2,
        min_count_for_failure_rate=2,
        device_timeout_seconds=90.0,
        labels={"fleet": "demo"},
    )


def _wait_online(api: ApiClient, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [d for d in api.devices("fleet=demo", limit=expected + 10) if d.online]
        if len(online) >= expected:
            return
        time.sleep(0.5)
    raise ApiClientError(f"only {len(online)} of {expected} devices came online in {timeout:.0f}s")


def _rollout(
    api: ApiClient, sim: FleetSimulator, release_id: str, version: str, plan: RolloutPlan, console: Console, quick: bool
) -> RolloutOutcome:
    from rich.live import Live

    created = api.create_rollout(release_id, plan)
    rollout_id = created.rollout_id
    started = time.monotonic()
    api.start_rollout(rollout_id)
    watch: dict[str, Any] = {"gate": None, "stages": 0}

    def on_poll(state: RolloutStatus) -> None:
        snap = sim.snapshot()
        watch["stages"] = max(watch["stages"], state.current_stage + 1)
        if state.state in ("rolled_back", "aborted", "paused") and watch["gate"] is None:
            watch["gate"] = time.monotonic() - started
        live.update(_progress_table(version, state, snap.versions))

    with Live(console=console, refresh_per_second=4, transient=True) as live:
        final = api.wait_rollout(rollout_id, timeout=120 if quick else 240, on_poll=on_poll)
        all_back = None
        if final.state != "completed":  # wait until no device serves the bad version any more
            deadline = time.monotonic() + 90
            while sim.snapshot().versions.get(version, 0) and time.monotonic() < deadline:
                on_poll(api.rollout(rollout_id))
                time.sleep(0.3)
            if not sim.snapshot().versions.get(version, 0):
                all_back = time.monotonic() - started
    reasons: dict[str, int] = {}
    for dep in final.deployments or []:
        if dep.state in ("failed", "rolled_back") and dep.mode == "install":
            reasons[dep.reason or "?"] = reasons.get(dep.reason or "?", 0) + 1
    served_devices, served_requests = sim.served(version)
    return RolloutOutcome(
        version=version,
        rollout_id=rollout_id,
        state=final.state,
        reason=final.reason,
        detail=final.detail,
        seconds=time.monotonic() - started,
        stages_reached=watch["stages"],
        stage_count=final.stage_count,
        counts={k: v for k, v in final.counts.items() if v},
        gate_seconds=watch["gate"],
        all_back_seconds=all_back,
        served_devices=served_devices,
        served_requests=served_requests,
        device_reasons=reasons,
    )


def _progress_table(version: str, state: RolloutStatus, versions: dict[str, int]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2))
    stage = f"stage {state.current_stage + 1}/{state.stage_count}"
    counts = ", ".join(f"{k} {v}" for k, v in state.counts.items() if v) or "-"
    table.add_row(f"      {version}", f"[bold]{state.state}[/]", stage, counts)
    table.add_row("", "fleet serving", ", ".join(f"{v}: {n}" for v, n in sorted(versions.items())), "")
    return table


def _summary(
    console: Console, opts: DemoOptions, stack: Stack, sim: FleetSimulator, outcomes: list[RolloutOutcome]
) -> bool:
    snap = sim.snapshot()
    table = Table(title="Rollouts", title_justify="left")
    for col in ("release", "result", "stages reached", "devices", "time"):
        table.add_column(col)
    for o in outcomes:
        devices = ", ".join(f"{k} {v}" for k, v in o.counts.items())
        table.add_row(
            o.version,
            f"{o.state} ({o.reason or 'ok'})",
            f"{o.stages_reached}/{o.stage_count}",
            devices,
            f"{o.seconds:.1f}s",
        )
    console.print()
    console.print(table)
    versions = Table(title="Devices per serving version now", title_justify="left")
    versions.add_column("version")
    versions.add_column("devices", justify="right")
    for version, count in sorted(snap.versions.items()):
        versions.add_row(version, str(count))
    console.print(versions)
    good, mid, bad = outcomes
    ok = good.state == "completed" and mid.state == "completed" and bad.state == "rolled_back"
    ok = ok and snap.versions.get(VERSIONS[1], 0) == opts.devices
    console.print(f"[bold]The bad release[/] {bad.version}: the gate that fired: {bad.detail or bad.reason}")
    if bad.device_reasons:
        why = ", ".join(f"{n} x {r}" for r, n in bad.device_reasons.items())
        console.print(f"  devices reported: {why} (each canary judged the new model in its trial window)")
    if bad.served_requests:
        console.print(
            f"  {bad.served_devices} of {opts.devices} devices answered {bad.served_requests} live requests with it,"
            " all inside their trial windows"
        )
    else:
        console.print("  it answered no live request: the canaries' first trial probes caught it")
    if bad.gate_seconds is not None:
        console.print(
            f"  rollout halted {bad.gate_seconds:.1f}s after it started, at stage {bad.stages_reached}/{bad.stage_count}"
        )
    if bad.all_back_seconds is not None:
        console.print(
            f"  every device served {VERSIONS[1]} again {bad.all_back_seconds:.1f}s after the rollout started"
        )
    console.print(f"\n[bold]Where to look[/]: API docs {stack.docs_url} (token: see below with --keep-running)")
    console.print(f"  logs, database, bundles and device folders: {stack.workdir}")
    if opts.loop:  # the loop comes next; the demo's own verdict is printed at the very end
        console.print(
            "[green]rollout story finished as expected[/]" if ok else "[red]rollout story did not go as expected[/]"
        )
    else:
        console.print("[bold green]demo finished as expected[/]" if ok else "[bold red]demo did not go as expected[/]")
    return ok


def _keep_running(console: Console, stack: Stack) -> None:
    console.print(f"\nKeeping everything up. Server {stack.server_url} (docs {stack.docs_url}), admin token:")
    console.print(f"  {stack.admin_token}")
    console.print("Ctrl-C stops the fleet, the server and the broker.")
    while True:
        time.sleep(1)
