"""The idle-scale mode: emulator shards on their own source addresses, edge brokers bridged to the core broker.

The end-to-end test runs the bench's idle mode at a small size with everything real (the local stack's Mosquitto,
PostgreSQL, ``edgeota server run``, edge Mosquittos configured by ``edgeota broker config``, shard processes): every
device reaches its edge from its shard's address, the core sees no device, the server acknowledges every device's
check-ins, nothing retained is left and no process survives. The bridge test checks the routing and the edge's
login on their own, and the layout tests the split.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench.idle_measure import retained_count
from bench.scale_idle import idle_run, plan_layout
from edgeota.broker import start_broker
from edgeota.emulator.shard import load_config, main
from edgeota.fleet.bridges import edge_brokers
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.topics import Channel, device_topic, mosquitto_acl_patterns
from ota_server.core.security import mosquitto_password_hash


def _client(name: str, user: str | None = None, password: str | None = None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
    if user:
        client.username_pw_set(user, password)
    return client


def test_layout_splits_devices_evenly_and_refuses_what_does_not_fit() -> None:
    layout = plan_layout(900, 3, 2)
    assert layout.shards == (300, 300, 300) and layout.edge_of == (0, 1, 0) and layout.edge_devices == [600, 300]
    assert [layout.source_address(s) for s in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    full = plan_layout(50_000)
    assert len(full.shards) == 4 and max(full.shards) <= 15_000 and max(full.edge_devices) <= 16_000
    assert sum(full.shards) == 50_000 and plan_layout(7, 3).shards == (3, 2, 2)
    with pytest.raises(ValueError, match="in a shard"):
        plan_layout(50_000, 2)
    with pytest.raises(ValueError, match="on an edge"):
        plan_layout(50_000, 4, 2)
    with pytest.raises(ValueError, match="edge brokers for 2 shards"):
        plan_layout(100, 2, 3)
    with pytest.raises(ValueError, match="at least one device"):
        plan_layout(0)


def test_shard_refuses_a_bad_configuration_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shard.json"
    path.write_text(json.dumps({"provisioning_file": "x", "broker_host": "h", "status_file": "s"}), encoding="utf-8")
    with pytest.raises(EdgeotaError, match="bad shard configuration"):
        load_config(path)
    path.write_text(json.dumps({"provisioning_file": "x", "broker_host": "h", "broker_port": 1, "status_file": "s"}))
    assert load_config(path).broker_port == 1
    (tmp_path / "devices.jsonl").write_text("{not json}\n", encoding="utf-8")
    data = {"provisioning_file": str(tmp_path / "devices.jsonl"), "broker_host": "127.0.0.1", "broker_port": 1}
    path.write_text(json.dumps({**data, "status_file": str(tmp_path / "status.json")}), encoding="utf-8")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "devices.jsonl:1: not a device provisioning" in err and err.count("\n") == 1


@pytest.mark.integration
def test_edge_bridge_routes_each_device_topic_and_requires_a_login(tmp_path: Path) -> None:
    device, password = f"dev-{uuid.uuid4().hex[:6]}", secrets.token_hex(8)
    other = f"dev-{uuid.uuid4().hex[:6]}"
    auth = tmp_path / "auth"
    auth.mkdir()
    (auth / "passwd").write_text(f"{device}:{mosquitto_password_hash(password)}\n", encoding="utf-8")
    (auth / "acl").write_text("\n".join(mosquitto_acl_patterns()) + "\n", encoding="utf-8")
    conf = f"allow_anonymous false\npassword_file {auth / 'passwd'}\nacl_file {auth / 'acl'}\n"
    (auth / "edgeota.conf").write_text(conf + "use_username_as_clientid true\n", encoding="utf-8")
    got: list[tuple[str, str, bytes]] = []
    with (
        start_broker("mosquitto", data_dir=tmp_path / "core") as core,
        edge_brokers(core, auth, [[device], [other]], tmp_path / "edges") as edges,
    ):
        watcher = _client("watcher")
        watcher.on_message = lambda _c, _u, m: got.append(("core", m.topic, bytes(m.payload)))
        watcher.connect(core.host, core.port)
        watcher.loop_start()
        watcher.subscribe("edgeota/v1/devices/#", qos=1)
        dev = _client(device, device, password)
        dev.on_message = lambda _c, _u, m: got.append(("device", m.topic, bytes(m.payload)))
        dev.connect(edges[0].host, edges[0].port, bind_address="127.0.0.2")
        dev.loop_start()
        dev.subscribe(device_topic(device, Channel.CMD), qos=1)
        time.sleep(0.5)
        dev.publish(device_topic(device, Channel.PRESENCE), b"online", qos=1, retain=True).wait_for_publish(5)
        dev.publish(device_topic(device, Channel.CHECKIN), b"checkin", qos=1).wait_for_publish(5)
        watcher.publish(device_topic(device, Channel.CMD), b"ack", qos=1)
        time.sleep(1.0)
        assert ("core", device_topic(device, Channel.CHECKIN), b"checkin") in got
        assert ("device", device_topic(device, Channel.CMD), b"ack") in got
        assert retained_count(core.host, core.port, wait=1.0) == 1  # the presence crossed the bridge, retained
        dev.publish(device_topic(device, Channel.PRESENCE), b"", qos=1, retain=True).wait_for_publish(5)
        time.sleep(1.0)
        assert retained_count(core.host, core.port, wait=1.0) == 0  # and its clearing too
        refused: list[object] = []
        stranger = _client("stranger")
        stranger.on_connect = lambda _c, _u, _f, rc, _p: refused.append(rc)
        stranger.connect(edges[1].host, edges[1].port)
        stranger.loop_start()
        time.sleep(1.0)
        stranger.loop_stop()
        assert refused and getattr(refused[0], "is_failure", False)  # no anonymous device on an edge
        conf_text = (tmp_path / "edges" / "edge-1" / "mosquitto.conf").read_text(encoding="utf-8")
        assert f"topic {device_topic(other, Channel.CMD)} in 1" in conf_text and device not in conf_text
        dev.disconnect()
        dev.loop_stop()
        watcher.disconnect()
        watcher.loop_stop()
        pids = [e.pid for e in edges]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


@pytest.mark.integration
@pytest.mark.postgres
def test_idle_mode_connects_devices_through_shards_and_edges(tmp_path: Path) -> None:
    layout = plan_layout(600, 3, 2)
    entry = idle_run(600, 0, "postgresql", 4.0, layout, connect_per_second=600.0, workdir=tmp_path / "run")
    assert "error" not in entry, entry.get("error")
    assert entry["devices"] == 600 and entry["emulated"] is True and entry["committed"] == 0
    idle = entry["idle"]
    assert idle["connected_at_start"] == idle["connected_at_end"] == 600
    assert entry["seconds_to_all_checked_in"] is not None
    # Each edge holds exactly its shards' devices, from their own source addresses, plus its bridge.
    conns = idle["connections"]
    assert conns["edge-0"]["by_peer_address"] == {"127.0.0.1": 1, "127.0.0.2": 200, "127.0.0.4": 200}
    assert conns["edge-1"]["by_peer_address"] == {"127.0.0.1": 1, "127.0.0.3": 200}
    assert conns["broker_core"]["established"] == 3  # the server and two bridges: no device on the core
    # The server acknowledged every check-in of the window but those still in flight when it closed (the shards'
    # status files are up to 2 s apart, so a few may be counted on either side).
    checkins = idle["checkins"]
    assert checkins["sent"] > 0 and checkins["acked_by_server"] >= checkins["sent"] - checkins["unacked_at_end"] - 3
    assert entry["brokers"]["edges"] == [{"name": "edge-0", "devices": 400}, {"name": "edge-1", "devices": 200}]
    for group in ("server", "broker_core", "broker_edges", "devices", "shard-0", "edge-1"):
        assert idle["rss_mb_steady"][group] > 0 and idle["cpu_cores"][group] >= 0
    assert entry["peak_rss_mb"]["broker"] >= idle["rss_mb_steady"]["broker_edges"]
    assert idle["presence_not_cleared"] == idle["disconnects_aborted"] == 0 and idle["shards_stopped_cleanly"] == 3
    assert entry["retained_left_on_core"] == 0
    statuses = [json.loads((tmp_path / "run" / f"shard-{s}" / "status.json").read_text()) for s in range(3)]
    assert [s["phase"] for s in statuses] == ["stopped"] * 3 and all(s["open_file_limit"] >= 1024 for s in statuses)
    for status in statuses:
        assert not psutil.pid_exists(status["pid"]) or psutil.Process(status["pid"]).status() == psutil.STATUS_ZOMBIE
