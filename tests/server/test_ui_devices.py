"""Dashboard device pages: filters and paging in SQL, saved filters per token, bulk labelling by role, device page."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select

from ota_server.context import ServerContext
from ota_server.models import AuditEntry, Device, DeviceModel, utcnow

from .ui_helpers import browser, error_message, fleet, new_token, sign_in


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr data-device-id="([^"]+)"', html)


def _seed(client: TestClient, ctx: ServerContext) -> None:
    fleet(client, 30, site="north")
    fleet(client, 25, prefix="s", site="south")
    fleet(client, 5, profile="arm64", prefix="a")
    with ctx.sessions() as session:
        for dev_id in ("d000", "d001", "a000"):
            session.add(
                DeviceModel(
                    device_id=dev_id, model_name="digits", version="1.2.0", bundle_sha256="b" * 64, release_counter=1
                )
            )
        online = session.get(Device, "d002")
        assert online is not None
        online.presence_online, online.last_seen = True, utcnow()
        session.commit()


def test_filters_and_pages(client: TestClient, ctx: ServerContext) -> None:
    _seed(client, ctx)
    sign_in(client)
    first = client.get("/ui/devices?size=25")
    assert first.status_code == 200 and 'data-total="60"' in first.text
    assert _rows(first.text) == sorted(_rows(first.text)) and len(_rows(first.text)) == 25
    third = client.get("/ui/devices?size=25&page=3")
    assert len(_rows(third.text)) == 10 and not set(_rows(third.text)) & set(_rows(first.text))
    assert 'id="next-page"' in first.text and 'id="next-page"' not in third.text
    assert set(_rows(client.get("/ui/devices?profile=arm64").text)) == {f"a00{i}" for i in range(5)}
    south = client.get("/ui/devices?labels=site%3Dsouth&size=100").text
    assert len(_rows(south)) == 25 and all(r.startswith("s") for r in _rows(south))
    assert _rows(client.get("/ui/devices?version=1.2.0").text) == ["a000", "d000", "d001"]
    assert _rows(client.get("/ui/devices?version=1.2.0&profile=x86").text) == ["d000", "d001"]
    assert _rows(client.get("/ui/devices?online=yes").text) == ["d002"]
    assert 'data-total="59"' in client.get("/ui/devices?online=no").text
    assert _rows(client.get("/ui/devices?q=s02").text) == [f"s02{i}" for i in range(5)]
    assert _rows(client.get("/ui/devices?q=%25").text) == []  # a wildcard is searched as text
    assert 'data-total="0"' in client.get("/ui/devices?state=failed").text


def test_bad_filter_values_are_a_400_page(client: TestClient) -> None:
    sign_in(client)
    for query in (
        "state=exploded",
        "online=maybe",
        "labels=novalue",
        "labels=bad%20key%3Dv",
        "size=7",
        "page=0",
        "page=abc",
        "q=%3Cscript%3E",
        "profile=" + "x" * 600,
    ):
        resp = client.get(f"/ui/devices?{query}")
        assert resp.status_code == 400, query
        assert error_message(resp.text), query


def test_saved_filters_belong_to_their_token(client: TestClient, ctx: ServerContext) -> None:
    _seed(client, ctx)
    ops = browser(client)
    csrf = sign_in(ops, new_token(client, "operator", "ops"))
    saved = ops.post(
        "/ui/devices/filters",
        data={"csrf": csrf, "name": "north arm", "labels": "site=north", "profile": "x86"},
        follow_redirects=False,
    )
    assert saved.status_code == 303
    page = ops.get(saved.headers["location"]).text
    link = re.search(r'<a class="saved-filter" data-name="north arm" href="([^"]+)"', page)
    assert link is not None
    assert len(_rows(ops.get(link.group(1).replace("&amp;", "&")).text)) == 30
    # Saving the same name again replaces it.
    ops.post("/ui/devices/filters", data={"csrf": csrf, "name": "north arm", "profile": "arm64"})
    assert page.count('data-name="north arm"') >= 1
    assert ops.get("/ui/devices").text.count('class="saved-filter" data-name="north arm"') == 1
    # Another token does not see them, and cannot delete them.
    admin_csrf = sign_in(client)
    assert 'data-name="north arm"' not in client.get("/ui/devices").text
    filter_id = re.search(r'action="/ui/devices/filters/(\d+)/delete"', ops.get("/ui/devices").text)
    assert filter_id is not None
    assert client.post(f"/ui/devices/filters/{filter_id.group(1)}/delete", data={"csrf": admin_csrf}).status_code == 404
    for bad in ({"name": "", "profile": "x86"}, {"name": "x" * 65, "profile": "x86"}, {"name": "empty"}):
        assert ops.post("/ui/devices/filters", data={"csrf": csrf, **bad}).status_code == 400, bad
    assert ops.post("/ui/devices/filters", data={"name": "nocsrf", "profile": "x86"}).status_code == 403
    gone = ops.post(f"/ui/devices/filters/{filter_id.group(1)}/delete", data={"csrf": csrf}, follow_redirects=False)
    assert gone.status_code == 303 and 'data-name="north arm"' not in ops.get("/ui/devices").text


def _labels(ctx: ServerContext, dev_id: str) -> dict[str, str]:
    with ctx.sessions() as session:
        device = session.get(Device, dev_id)
        assert device is not None
        return dict(device.labels)


def test_bulk_labelling_by_role_all_or_nothing(client: TestClient, ctx: ServerContext) -> None:
    _seed(client, ctx)
    ops = browser(client)
    csrf = sign_in(ops, new_token(client, "operator", "ops"))
    page = ops.get("/ui/devices?profile=arm64").text
    assert 'id="bulk-label-submit"' in page and 'class="device-select"' in page
    done = ops.post(
        "/ui/devices/labels",
        data={
            "csrf": csrf,
            "device_ids": ["a000", "a001", "a002"],
            "key": "rack",
            "value": "r7",
            "op": "set",
            "profile": "arm64",
        },
        follow_redirects=False,
    )
    assert done.status_code == 303 and "profile=arm64" in done.headers["location"]
    assert _labels(ctx, "a001") == {"ring": "a", "rack": "r7"} and "rack" not in _labels(ctx, "a003")
    with ctx.sessions() as session:
        audited = session.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == "device.labels")).all()
    assert sorted(audited) == ["a000", "a001", "a002"]
    ops.post("/ui/devices/labels", data={"csrf": csrf, "device_ids": ["a001"], "key": "rack", "op": "remove"})
    assert _labels(ctx, "a001") == {"ring": "a"}
    assert 'id="f-labels"' in ops.get("/ui/devices?labels=rack%3Dr7").text
    assert _rows(ops.get("/ui/devices?labels=rack%3Dr7").text) == ["a000", "a002"]
    # Rejections change nothing.
    unknown = ops.post(
        "/ui/devices/labels", data={"csrf": csrf, "device_ids": ["a003", "nope"], "key": "rack", "value": "r9"}
    )
    assert unknown.status_code == 404 and "rack" not in _labels(ctx, "a003")
    for bad in (
        {"device_ids": [], "key": "rack", "value": "r9"},
        {"device_ids": ["a003"], "key": "bad key", "value": "r9"},
        {"device_ids": ["a003"], "key": "rack", "value": "<b>"},
        {"device_ids": ["a003"], "key": "rack", "value": "r9", "op": "explode"},
        {"device_ids": ["a003"], "key": "rack", "value": "r9", "state": "bogus"},
    ):
        assert ops.post("/ui/devices/labels", data={"csrf": csrf, **bad}).status_code == 400, bad
    assert ops.post("/ui/devices/labels", data={"device_ids": ["a003"], "key": "k", "value": "v"}).status_code == 403
    viewer = browser(client)
    viewer_csrf = sign_in(viewer, new_token(client, "viewer", "watcher"))
    assert 'id="bulk-label-submit"' not in viewer.get("/ui/devices").text
    forged = viewer.post(
        "/ui/devices/labels", data={"csrf": viewer_csrf, "device_ids": ["a003"], "key": "k", "value": "v"}
    )
    assert forged.status_code == 403 and "k" not in _labels(ctx, "a003")


def test_device_page_and_its_rejections(client: TestClient, ctx: ServerContext) -> None:
    _seed(client, ctx)
    sign_in(client)
    page = client.get("/ui/devices/d000")
    assert page.status_code == 200
    for section in ("device-summary", "device-models", "checkins", "deployments", "status-events", "device-telemetry"):
        assert f'id="{section}"' in page.text, section
    assert "1.2.0" in page.text
    missing = client.get("/ui/devices/nope")
    assert missing.status_code == 404 and "not found" in error_message(missing.text)
    assert client.get("/ui/devices/bad%20id").status_code == 400
