"""What a simulated fleet is made of: its configuration (:class:`FleetConfig`), the settings every simulated
agent gets, and the records the simulator keeps per device (:class:`SimDevice`) and per moment (:class:`FleetSnapshot`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeota.fleet.agents import SimAgent
from edgeota.fleet.faults import Fault
from edgeota.fleet.load import Drift, InputSampler, InputSource
from edgeota.fleet.netcut import CuttableProxy
from edgeota.fleet.provision import DevicePlan
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

# Agent settings that make a simulated fleet converge in seconds rather than minutes.
FAST_AGENT_SETTINGS: dict[str, Any] = {
    "heartbeat_seconds": 10.0,
    "telemetry_window_seconds": 5.0,
    "report_retry_seconds": 3.0,
    "download_backoff_seconds": 0.5,
    "download_backoff_max_seconds": 5.0,
    "download_stall_seconds": 10.0,
    "trial_requests": 40,
    "trial_seconds": 8.0,
    "trial_probe_interval_seconds": 0.5,
    # Dozens of agents share this process's cores, so a request can wait for the GIL or a core for a few
    # milliseconds: real devices have their own CPUs. The manifest's latency budget still applies as is.
    "health_latency_slack_ms": 25.0,
    "log_level": "WARNING",
    # Hundreds of agents in one process would each run a thread asking the server's /healthz; the simulator
    # watches the fleet through the server instead.
    "server_check_seconds": 0.0,
}
# How often the interpreter lets another thread run: Python's default (5 ms) would add up to 5 ms to a
# request whose inference is done but whose thread waits for the GIL; agents measure that as latency.
# With hundreds of threads the shorter interval backfires (every waiting thread wakes that often to ask for the
# GIL, and the process thrashes), so it is only used for demo-sized fleets.
SWITCH_INTERVAL_SECONDS = 0.0005
SWITCH_INTERVAL_MAX_DEVICES = 100


class FleetConfigError(EdgeotaError):
    """A fleet configuration the simulator cannot run."""

    default_reason = ReasonCode.INTERNAL_ERROR


@dataclass
class FleetConfig:
    devices: int
    profiles: Sequence[str]
    server_url: str
    admin_token: str
    workdir: Path
    faults: Sequence[Fault] = ()
    rate_per_device: float = 5.0
    seed: int = 0
    prefix: str = "sim"
    labels: Mapping[str, str] = field(default_factory=dict)
    agent_overrides: Mapping[str, Any] = field(default_factory=dict)
    load_threads: int = 2
    shared_mqtt_loop: bool = True  # False: each agent's link runs paho's own thread (at most ~140 per process)
    mqtt_loop_workers: int = 4
    poll_seconds: float | None = None  # set: assignments come only from HTTP polls every this many seconds
    poll_threads: int = 2
    # Where inference inputs come from: the bundle's test vectors (a handful of rows) or the digits data set
    # (natural inputs: exercises output-based gates such as a NaN rate; see edgeota.fleet.load).
    input_source: InputSource = "test_vectors"
    # Share of requests whose true label the simulated application reports back through the agent's feedback
    # call (``predict_tracked`` + ``feedback``); only inputs drawn from the digits data set have a known label.
    feedback_share: float = 0.0


@dataclass
class DeviceStats:
    requests: int = 0
    errors: int = 0
    no_model: int = 0
    served: Counter[str] = field(default_factory=Counter)  # requests per model version that answered them


@dataclass
class SimDevice:
    plan: DevicePlan
    folder: Path
    config_path: Path
    faults: list[Fault]
    proxy: CuttableProxy | None = None
    agent: SimAgent | None = None
    running: bool = False
    stats: DeviceStats = field(default_factory=DeviceStats)
    drift: Drift | None = None
    sampler: InputSampler | None = None
    sampler_digest: str | None = None
    spent: list[Fault] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return self.plan.device_id


@dataclass(frozen=True)
class FleetSnapshot:
    at: float
    running: int
    versions: dict[str, int]
    requests: int
    errors: int
