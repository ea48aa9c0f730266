"""Sample metadata (stream, predictions, confidences) stored per sample, and the Parquet dataset export
(service, route, client, CLI), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from edgeota_contract.errors import ContractError
from ota_server import cli_common
from ota_server.client import ApiClient, ApiClientError, ClientSettings
from ota_server.client_datasets import verify_dataset
from ota_server.context import ServerContext
from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import StoredSample
from ota_server.services import datasets
from ota_server.services import samples as svc

from .conftest import ADMIN, AUTH, BundleFactory, make_token, upload

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _ns(t: datetime) -> int:
    return int(t.timestamp()) * 10**9


def _sample(sha: str, seed: int = 0, rows: int = 2, **members: Any) -> bytes:
    """An agent-shaped sample: ``in.x`` [rows, 4] and full metadata; ``members`` replace (None: drop) members."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {
        "in.x": rng.normal(size=(rows, 4)).astype(np.float32),
        "meta.stream": np.array("uniform"),
        "meta.time_ns": np.array(_ns(T0) + seed, dtype=np.int64),
        "meta.model_name": np.array("digits"),
        "meta.version": np.array("1.0.0"),
        "meta.bundle_sha256": np.array(sha),
        "meta.prediction": np.arange(rows, dtype=np.int64) % 2,
        "meta.confidence": np.linspace(0.9, 0.4, rows),
    }
    for name, value in members.items():
        key = name.replace("__", ".")
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _hard(sha: str, seed: int = 0, rows: int = 1, **members: Any) -> bytes:
    hard = {"meta__stream": np.array("hard"), "meta__reason": np.array("low_confidence")}
    return _sample(sha, seed, rows, **{**hard, "meta__confidence": np.full(rows, 0.3), **members})


def _device(client: TestClient, device_id: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    body = {"device_id": device_id, "hardware_profile": "x86", "labels": labels or {}}
    resp = client.post("/api/v1/devices", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def _post(
    client: TestClient, device_id: str, auth: dict[str, str], body: bytes, sha: str, version: str = "1.0.0"
) -> Any:
    name = f"{_ns(T0)}-digits-{version}-{sha[:12]}.npz"
    return client.post(
        f"/api/v1/devices/{device_id}/samples",
        content=body,
        headers={"Content-Type": "application/octet-stream", "X-Edgeota-Sample": name, **auth},
    )


def _rows(ctx: ServerContext) -> list[StoredSample]:
    with ctx.sessions() as session:
        return list(session.scalars(select(StoredSample).order_by(StoredSample.id)))


@pytest.fixture
def release(client: TestClient, make_bundle: BundleFactory) -> dict[str, Any]:
    resp = upload(client, make_bundle("1.0.0", "x86"))
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


# ---------------------------------------------------------------- metadata on upload


def test_metadata_is_stored_with_each_sample(client: TestClient, ctx: ServerContext, release: dict[str, Any]) -> None:
    sha = release["bundle_sha256"]
    dev = _device(client, "cam-1")
    assert _post(client, "cam-1", dev, _sample(sha, 1), sha).status_code == 201
    assert (
        _post(client, "cam-1", dev, _hard(sha, 2, rows=1, meta__confidence=np.array([np.nan])), sha).status_code == 201
    )
    legacy = io.BytesIO()
    legacy_arrays: dict[str, Any] = {"in.x": np.ones((3, 4), dtype=np.float32)}
    np.savez(legacy, **legacy_arrays)  # an agent from before the streams
    assert _post(client, "cam-1", dev, legacy.getvalue(), sha).status_code == 201
    again = _post(client, "cam-1", dev, _sample(sha, 1), sha)  # a retry after a lost answer
    assert again.status_code == 200
    uniform, hard, old = _rows(ctx)
    assert len(_rows(ctx)) == 3
    assert (uniform.stream, uniform.reason, uniform.rows) == ("uniform", None, 2)
    assert uniform.predictions == [0, 1] and uniform.confidences == pytest.approx([0.9, 0.4])
    assert uniform.sampled_at == T0 + timedelta(microseconds=0)
    assert (uniform.device_id, uniform.bundle_sha256, uniform.version) == ("cam-1", sha, "1.0.0")
    assert uniform.sha256 == hashlib.sha256(_sample(sha, 1)).hexdigest()  # still content-addressed
    assert (hard.stream, hard.reason, hard.confidences) == ("hard", "low_confidence", [None])  # NaN: unknown
    assert (old.stream, old.rows, old.predictions, old.sampled_at) == ("uniform", 3, None, None)


def test_a_crash_between_file_and_row_is_repaired_by_the_retry(
    client: TestClient, ctx: ServerContext, release: dict[str, Any]
) -> None:
    sha = release["bundle_sha256"]
    dev = _device(client, "cam-1")
    body = _sample(sha, 5)
    assert _post(client, "cam-1", dev, body, sha).status_code == 201
    with ctx.sessions() as session:  # as if the server died after the rename, before the insert
        session.query(StoredSample).delete()
        session.commit()
    assert _post(client, "cam-1", dev, body, sha).status_code == 200
    assert [r.sha256 for r in _rows(ctx)] == [hashlib.sha256(body).hexdigest()]


BAD_METADATA: list[tuple[str, dict[str, Any], int]] = [
    ("unknown member", {"meta__colour": np.array("red")}, 400),
    ("pickled array", {"meta__stream": np.array(["uniform", None], dtype=object)}, 400),
    ("unknown stream", {"meta__stream": np.array("random")}, 422),
    ("stream not a string", {"meta__stream": np.array(1)}, 422),
    ("no stream", {"meta__stream": None}, 422),
    ("no time", {"meta__time_ns": None}, 422),
    ("time as float", {"meta__time_ns": np.array(1.5)}, 422),
    ("time far ahead", {"meta__time_ns": np.array(_ns(datetime.now(UTC) + timedelta(days=3)), dtype=np.int64)}, 422),
    ("time before 2000", {"meta__time_ns": np.array(10**9, dtype=np.int64)}, 422),
    ("another model", {"meta__model_name": np.array("other")}, 422),
    ("another version", {"meta__version": np.array("2.0.0")}, 422),
    ("another bundle", {"meta__bundle_sha256": np.array("f" * 64)}, 422),
    ("prediction alone", {"meta__confidence": None}, 422),
    ("confidence alone", {"meta__prediction": None}, 422),
    ("lengths differ", {"meta__confidence": np.array([0.5])}, 422),
    ("confidence over 1", {"meta__confidence": np.array([0.5, 1.5])}, 422),
    ("confidence infinite", {"meta__confidence": np.array([0.5, np.inf])}, 422),
    ("confidence as ints", {"meta__confidence": np.array([0, 1])}, 422),
    ("negative class", {"meta__prediction": np.array([0, -1])}, 422),
    ("class as float", {"meta__prediction": np.array([0.0, 1.0])}, 422),
    ("no rows", {"meta__prediction": np.zeros(0, dtype=np.int64), "meta__confidence": np.zeros(0)}, 422),
    ("inputs of other rows", {"in__x": np.zeros((3, 4), dtype=np.float32)}, 422),
    ("no inputs", {"in__x": None}, 422),
    ("reason on uniform", {"meta__reason": np.array("low_confidence")}, 422),
    ("hard without reason", {"meta__stream": np.array("hard")}, 422),
    ("hard, unknown reason", {"meta__stream": np.array("hard"), "meta__reason": np.array("hunch")}, 422),
    (
        "hard without predictions",
        {
            "meta__stream": np.array("hard"),
            "meta__reason": np.array("low_confidence"),
            "meta__prediction": None,
            "meta__confidence": None,
        },
        422,
    ),
]


@pytest.mark.parametrize(("case", "members", "status"), BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_bad_metadata_is_refused_and_stores_nothing(
    client: TestClient, ctx: ServerContext, release: dict[str, Any], case: str, members: dict[str, Any], status: int
) -> None:
    sha = release["bundle_sha256"]
    dev = _device(client, "cam-1")
    resp = _post(client, "cam-1", dev, _sample(sha, 0, **members), sha)
    assert resp.status_code == status, (case, resp.text)
    assert resp.headers["content-type"] == "application/problem+json"
    root = svc.samples_root(ctx.settings.data_dir)
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))
    assert _rows(ctx) == [] and list(ctx.settings.tmp_dir.glob("sample-*")) == []


# ---------------------------------------------------------------- export


@pytest.fixture
def fleet(client: TestClient, make_bundle: BundleFactory, release: dict[str, Any]) -> dict[str, Any]:
    """Two releases; north-1 (cohort north) and plain-1 (no cohort label) upload both streams."""
    newer = upload(client, make_bundle("1.1.0", "x86")).json()
    north = _device(client, "north-1", {"cohort": "north", "site": "a b/c"})
    plain = _device(client, "plain-1")
    old, new = release["bundle_sha256"], newer["bundle_sha256"]
    new_meta: dict[str, Any] = {"meta__version": np.array("1.1.0"), "meta__bundle_sha256": np.array(new)}
    posts = [
        ("north-1", north, _sample(old, 1), old, "1.0.0"),
        ("north-1", north, _hard(old, 2, rows=2), old, "1.0.0"),
        ("north-1", north, _sample(new, 3, **new_meta), new, "1.1.0"),
        ("north-1", north, _hard(new, 4, **new_meta), new, "1.1.0"),
        ("plain-1", plain, _sample(old, 5, rows=3), old, "1.0.0"),
        ("plain-1", plain, _hard(new, 6, **new_meta), new, "1.1.0"),
    ]
    for device_id, auth, body, sha, version in posts:
        resp = _post(client, device_id, auth, body, sha, version)
        assert resp.status_code == 201, resp.text
    return {"old": release["release_id"], "new": newer["release_id"]}


def _api(client: TestClient, token: str = ADMIN) -> ApiClient:
    return ApiClient(ClientSettings(url="http://testserver", token=token), http=client)


def _digest(folder: Path, paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update((folder / p).read_bytes())
    return h.hexdigest()


def test_export_writes_partitions_schema_counts_and_manifest(
    client: TestClient, fleet: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    report = {"max_psi": 0.4, "feature": "x[3]"}
    manifest = _api(client).export_dataset(out, "digits", trigger="alert:a1", drift_report=report)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert (
        files
        == sorted(
            f"release={fleet[r]}/cohort={c}/part-0.parquet"
            for r in ("old", "new")
            for c in ("north", "__HIVE_DEFAULT_PARTITION__")
        )
        == [f.path for f in manifest.files]
    )
    on_disk = json.loads((out / "_manifest.json").read_text())
    assert on_disk["digest"]["value"] == _digest(out, files) == manifest.digest["value"]
    assert on_disk["trigger"] == "alert:a1" and on_disk["drift_report"] == report
    assert on_disk["parent_release"]["release_id"] == fleet["new"]  # by default the latest release in the data
    assert on_disk["partitioning"]["cohort_label"] == "cohort"

    table = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 2 + 2 + 2 + 1 + 3 + 1 == on_disk["counts"]["rows"]
    names = set(table.column_names)
    expected = {"input_x", "prediction", "confidence", "label", "label_source", "device_id", "hardware_profile"}
    assert expected | {"time", "stream", "reason", "release", "cohort"} <= names
    assert [f["name"] for f in on_disk["schema"]] == [n for n in table.column_names if n not in ("release", "cohort")]
    rows = table.to_pylist()
    by_stream = {s: [r for r in rows if r["stream"] == s] for s in ("uniform", "hard")}
    assert len(by_stream["uniform"]) == 7 and len(by_stream["hard"]) == 4
    per_stream = on_disk["counts"]["per_stream"]
    assert per_stream["uniform"] == {"samples": 3, "rows": 7, "share_of_rows": 7 / 11}
    assert per_stream["hard"] == {"samples": 3, "rows": 4, "share_of_rows": 4 / 11}
    assert all(r["confidence"] == 0.3 and r["reason"] == "low_confidence" for r in by_stream["hard"])
    assert {r["cohort"] for r in rows} == {"north", None}
    assert {r["release"] for r in rows} == {fleet["old"], fleet["new"]}
    assert all(r["label"] is None and r["label_source"] is None for r in rows)  # no feedback API yet
    # the inputs are the uploaded rows, in order, next to their own prediction
    plain_old = [r for r in rows if r["device_id"] == "plain-1" and r["release"] == fleet["old"]]
    sent = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    assert [r["row"] for r in plain_old] == [0, 1, 2]
    assert np.array_equal(np.array([r["input_x"] for r in plain_old], dtype=np.float32), sent)
    assert [r["prediction"] for r in plain_old] == [0, 1, 0]
    assert on_disk["inputs"] == {"x": {"dtype": "float32", "row_shape": [4]}}
    assert verify_dataset(out).digest == manifest.digest


def test_export_filters_cohort_label_and_parent(
    client: TestClient, ctx: ServerContext, fleet: dict[str, Any], tmp_path: Path
) -> None:
    api = _api(client, make_token(client, "viewer")["Authorization"].split()[1])
    only_old = api.export_dataset(
        tmp_path / "a", "digits", version="1.0.0", cohort_label="site", parent_release=fleet["old"]
    )
    assert [f.path for f in only_old.files] == [
        f"release={fleet['old']}/cohort=__HIVE_DEFAULT_PARTITION__/part-0.parquet",
        f"release={fleet['old']}/cohort=a%20b%2Fc/part-0.parquet",  # label values are URI-encoded
    ]
    table = pads.dataset(tmp_path / "a", format="parquet", partitioning="hive").to_table()
    assert set(table.column("cohort").to_pylist()) == {"a b/c", None}
    assert only_old.parent_release == {"release_id": fleet["old"], "model_name": "digits", "version": "1.0.0"}
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    empty = api.export_dataset(tmp_path / "b", "digits", since=later)
    assert empty.files == [] and empty.counts["rows"] == 0 and empty.parent_release is None
    assert empty.digest["value"] == hashlib.sha256(b"").hexdigest()
    with ctx.sessions() as session:  # the service on its own, with an unknown parent
        with pytest.raises(NotFound):
            datasets.export_dataset(
                session,
                svc.samples_root(ctx.settings.data_dir),
                datasets.ExportQuery("digits", parent_release="nope"),
                tmp_path / "c",
            )
        with pytest.raises(InvalidRequest):
            datasets.export_dataset(
                session,
                svc.samples_root(ctx.settings.data_dir),
                datasets.ExportQuery("digits", trigger="a b"),
                tmp_path / "c",
            )


def test_export_refusals(client: TestClient, fleet: dict[str, Any], tmp_path: Path) -> None:
    dev = _device(client, "cam-9")
    url = "/api/v1/datasets/export"
    assert client.post(url, json={"model_name": "digits"}).status_code == 401
    assert client.post(url, json={"model_name": "digits"}, headers=dev).status_code == 403
    cases = [
        ({"model_name": "../x"}, 422),
        ({"model_name": "digits", "trigger": "two words"}, 422),
        ({"model_name": "digits", "since": "2026-01-01T00:00:00"}, 422),  # no time zone
        ({"model_name": "digits", "since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, 422),
        ({"model_name": "digits", "unknown": 1}, 422),
        ({"model_name": "digits", "drift_report": {"x": "y" * (1 << 20)}}, 422),
        ({"model_name": "digits", "parent_release": "missing"}, 404),
    ]
    for body, status in cases:
        resp = client.post(url, json=body, headers=AUTH)
        assert resp.status_code == status, (body, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ApiClientError, match="not an empty folder"):
        _api(client).export_dataset(tmp_path / "full", "digits")
    with pytest.raises(ApiClientError) as err:
        _api(client).export_dataset(tmp_path / "nothing", "digits", parent_release="missing")
    assert err.value.status == 404 and not (tmp_path / "nothing").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written export left


def test_tampered_exports_fail_verification(client: TestClient, fleet: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "export"
    manifest = _api(client).export_dataset(out, "digits")
    victim = out / manifest.files[0].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ApiClientError, match="does not match its sha256"):
        verify_dataset(out)
    victim.unlink()
    with pytest.raises(ApiClientError, match="differ from the manifest"):
        verify_dataset(out)


def test_the_archive_answer_is_a_plain_tar(client: TestClient, fleet: dict[str, Any]) -> None:
    resp = client.post("/api/v1/datasets/export", json={"model_name": "digits"}, headers=AUTH)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("_manifest.json").read())  # type: ignore[union-attr]
    assert names == ["_manifest.json", *(f["path"] for f in manifest["files"])]
    assert resp.headers["x-edgeota-dataset-digest"] == manifest["digest"]["value"]


def test_cli_export(client: TestClient, fleet: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from ota_server.cli_dataset import dataset_app

    app = typer.Typer()
    app.add_typer(dataset_app, name="dataset")
    monkeypatch.setattr(cli_common, "client", lambda server, token: _api(client))
    report = tmp_path / "drift.json"
    report.write_text(json.dumps({"psi": 0.5}))
    out = tmp_path / "cli-export"
    args = [
        "dataset",
        "export",
        "--model",
        "digits",
        "--out",
        str(out),
        "--trigger",
        "alert:7",
        "--drift-report",
        str(report),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["trigger"] == "alert:7" and manifest["drift_report"] == {"psi": 0.5}
    assert "36.4% of rows chosen by the model" in result.output
    report.write_text("[1, 2]")
    bad = CliRunner().invoke(app, [*args[:5], str(tmp_path / "other"), "--drift-report", str(report)])
    assert bad.exit_code != 0 and isinstance(bad.exception, ContractError) and "not a JSON object" in str(bad.exception)
