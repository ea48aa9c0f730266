"""An application process embedding the real device agent: `python server_shadow_driver.py agent.toml`.

It runs the agent exactly as `edgeota agent run` does (MQTT, downloads, slots, telemetry) and, as an
application would, sends it inference requests (4 rows every 20 ms) whenever a model is serving, so
shadow comparisons and telemetry windows are real. Stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from device_agent.agent import Agent
from device_agent.settings import AgentConfig
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import configure_logging


def main(config: Path) -> None:
    cfg = AgentConfig.load(config)
    configure_logging(cfg.settings.log_level)
    agent = Agent(cfg)
    agent.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = np.random.default_rng(1)
    try:
        while not stop.wait(0.02):
            with contextlib.suppress(EdgeotaError):  # no model yet
                agent.predict({"x": rng.uniform(0.1, 1.0, size=(4, 64)).astype(np.float32)})
    finally:
        agent.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
