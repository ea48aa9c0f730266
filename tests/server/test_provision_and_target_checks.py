"""Provisioning refuses a hardware profile the server does not know; a rollout that targets no device is refused
unless allow_empty (through the API, both databases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ota_server.core.config import Settings

from .conftest import AUTH, BundleFactory, Keys, upload


@pytest.fixture
def settings(tmp_path: Path, db_url: str, keys: Keys) -> Settings:
    """The suite's settings, but knowing only one listed profile and one profile file (not the session's list)."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "npu-a.yaml").write_text("id: npu-a\n")
    (folder / "notes.txt").write_text("not a profile\n")
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        release_keys=[keys.release_pub],
        admin_token="admin-token-for-tests-0123456789",
        mqtt_enabled=False,
        engine_enabled=False,
        max_bundle_bytes=200_000,
        public_url="http://testserver",
        hardware_profiles=["lab-board"],
        hardware_profiles_dir=folder,
    )


def provision(client: TestClient, profile: str, device_id: str) -> Any:
    return client.post("/api/v1/devices", json={"device_id": device_id, "hardware_profile": profile}, headers=AUTH)


def test_an_unknown_profile_is_refused_and_nothing_is_registered(client: TestClient) -> None:
    resp = provision(client, "rpi-4", "typo-1")
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith("unknown hardware profile 'rpi-4' (known: lab-board, npu-a)")
    assert "\n" not in detail
    assert client.get("/api/v1/devices", headers=AUTH).json() == []
    assert client.get("/api/v1/devices/typo-1", headers=AUTH).status_code == 404


def test_profiles_known_from_the_setting_the_folder_and_stored_releases(
    client: TestClient, make_bundle: BundleFactory
) -> None:
    assert provision(client, "lab-board", "d-setting").status_code == 201
    assert provision(client, "npu-a", "d-folder").status_code == 201
    assert provision(client, "notes", "d-notes").status_code == 422  # only YAML files are profiles
    assert provision(client, "custom-npu", "d-custom").status_code == 422
    assert upload(client, make_bundle("1.0.0", "custom-npu")).status_code == 201
    assert provision(client, "custom-npu", "d-custom").status_code == 201


def test_the_shipped_profiles_folder_is_the_default(tmp_path: Path) -> None:
    from ota_server.services.profiles import SHIPPED_PROFILES_DIR, folder_profiles, profiles_dir

    settings = Settings(data_dir=tmp_path / "d", hardware_profiles=[])
    assert profiles_dir(settings) == SHIPPED_PROFILES_DIR
    assert {"x86-avx2", "rpi4", "jetson-orin-nano"} <= folder_profiles(profiles_dir(settings))


def _release(client: TestClient, make_bundle: BundleFactory, profile: str = "npu-a") -> str:
    resp = upload(client, make_bundle("1.0.0", profile))
    assert resp.status_code == 201, resp.text
    release_id: str = resp.json()["release_id"]
    return release_id


def _create(client: TestClient, release_id: str, **extra: Any) -> Any:
    body = {"release_id": release_id, "selector": {"labels": {"ring": "a"}}, "stages": [{"percent": 100}], **extra}
    return client.post("/api/v1/rollouts", json=body, headers=AUTH)


def test_a_rollout_that_targets_no_device_is_refused(client: TestClient, make_bundle: BundleFactory) -> None:
    release_id = _release(client, make_bundle)
    # one device matches the labels, but the release has no bundle for its profile
    client.post(
        "/api/v1/devices",
        json={"device_id": "other", "hardware_profile": "lab-board", "labels": {"ring": "a"}},
        headers=AUTH,
    )
    for extra in ({}, {"start": True}, {"start_at": "2030-01-01T00:00:00Z"}):
        resp = _create(client, release_id, **extra)
        assert resp.status_code == 422, (extra, resp.text)
        detail = resp.json()["detail"]
        assert detail.startswith("the selection targets no device (1 matched without a bundle for their profile")
        assert "allow_empty (--allow-empty)" in detail
    assert client.get("/api/v1/rollouts", headers=AUTH).json() == []
    # a dry run still answers, and says so
    dry = _create(client, release_id, dry_run=True)
    assert dry.status_code == 200 and dry.json()["eligible"] == 0
    assert dry.json()["no_bundle_for_profile"] == ["other"]


def test_allow_empty_creates_it(client: TestClient, make_bundle: BundleFactory) -> None:
    release_id = _release(client, make_bundle)
    resp = _create(client, release_id, allow_empty=True)
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "draft"
    assert [r["rollout_id"] for r in client.get("/api/v1/rollouts", headers=AUTH).json()] == [resp.json()["rollout_id"]]


def test_a_rollout_with_a_target_is_not_affected(client: TestClient, make_bundle: BundleFactory) -> None:
    release_id = _release(client, make_bundle)
    client.post(
        "/api/v1/devices",
        json={"device_id": "n1", "hardware_profile": "npu-a", "labels": {"ring": "a"}},
        headers=AUTH,
    )
    resp = _create(client, release_id)
    assert resp.status_code == 201, resp.text
    assert resp.json()["preview"]["eligible"] == 1
