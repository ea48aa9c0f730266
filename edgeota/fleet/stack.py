"""The services of a local edgeota stack: a broker, release keys and the OTA server, all in one folder.

:func:`local_stack` is a context manager used by ``edgeota demo`` and the fleet benchmark. It
starts a broker (:func:`edgeota.broker.start_broker`), writes a release key pair, and runs the OTA
server (SQLite, local artifact store) as a child process through a :class:`~edgeota.procs.Supervisor`,
waiting for ``/healthz``. On exit, on an exception or on Ctrl-C it stops the server, then the broker.

Errors: :class:`~edgeota.procs.ProcessError` when the server does not become healthy (with the tail
of its log), :class:`~edgeota.broker.BrokerError` when no broker starts, :class:`WorkdirError`.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeota.broker import BrokerPreference, RunningBroker, free_port, start_broker
from edgeota.procs import Supervisor
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.signing import SigningKey, load_private_key, write_keypair

MARKER = ".edgeota-workdir"


class WorkdirError(EdgeotaError):
    """The work folder exists, is not empty, and was not made by edgeota: refusing to wipe it."""


@dataclass(frozen=True)
class Stack:
    workdir: Path
    broker: RunningBroker
    server_url: str
    admin_token: str
    release_key: SigningKey
    release_key_path: Path
    supervisor: Supervisor

    @property
    def docs_url(self) -> str:
        return f"{self.server_url}/docs"


def prepare_workdir(workdir: Path) -> Path:
    """Empty ``workdir`` for a fresh run (only if edgeota made it, or it is empty) and mark it.

    Raises:
        WorkdirError: the folder holds files edgeota did not create.
    """
    workdir = workdir.resolve()
    if workdir.exists():
        if not workdir.is_dir():
            raise WorkdirError(f"{workdir} exists and is not a folder")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise WorkdirError(f"{workdir} is not empty and was not made by edgeota; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by edgeota; wiped on the next run\n", encoding="utf-8")
    return workdir


def server_env(data_dir: Path, port: int, broker: RunningBroker, admin_token: str, release_pub: Path) -> dict[str, str]:
    """Environment for ``edgeota server run``: SQLite and artifacts under ``data_dir``, the given broker."""
    return {
        "EDGEOTA_SERVER_DATA_DIR": str(data_dir),
        "EDGEOTA_SERVER_DATABASE_URL": f"sqlite:///{data_dir / 'edgeota.db'}",
        "EDGEOTA_SERVER_ADMIN_TOKEN": admin_token,
        "EDGEOTA_SERVER_RELEASE_KEYS": str(release_pub),
        "EDGEOTA_SERVER_MQTT_HOST": broker.host,
        "EDGEOTA_SERVER_MQTT_PORT": str(broker.port),
        "EDGEOTA_SERVER_MQTT_PROTOCOL": "3.1.1" if broker.kind == "amqtt" else "auto",
        "EDGEOTA_SERVER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "EDGEOTA_SERVER_LOG_LEVEL": "WARNING",
    }


@contextmanager
def local_stack(
    workdir: Path, broker: BrokerPreference = "auto", server_env_extra: dict[str, str] | None = None
) -> Iterator[Stack]:
    """Start broker and server under ``workdir`` (which must already be prepared); stop both on exit."""
    keys = workdir / "keys"
    priv, pub = write_keypair(keys / "release.pem")
    admin_token = "demo-admin-" + secrets.token_hex(16)
    # Exits run in reverse: the server (supervisor) stops before the broker it talks to.
    with (
        start_broker(broker, data_dir=workdir / "broker") as running_broker,
        Supervisor(workdir / "logs") as supervisor,
    ):
        port = free_port()
        env = server_env(workdir / "server", port, running_broker, admin_token, pub)
        env.update(server_env_extra or {})
        argv = [sys.executable, "-m", "edgeota.cli", "server", "run", "--host", "127.0.0.1", "--port", str(port)]
        server = supervisor.start("server", argv, env=env)
        url = f"http://127.0.0.1:{port}"
        supervisor.wait_http(server, f"{url}/healthz", timeout=60)
        yield Stack(workdir, running_broker, url, admin_token, load_private_key(priv), priv, supervisor)
