"""Dashboard overview, releases, telemetry (real ingest of telemetry windows) and the offline API docs."""

from __future__ import annotations

import re
from datetime import timedelta

import numpy as np
from fastapi.testclient import TestClient

from ota_server.context import ServerContext
from ota_server.models import utcnow

from .conftest import BundleFactory, upload
from .test_telemetry_api import SHIFTED, Fleet, _reference
from .ui_helpers import error_message, fleet, sign_in


def test_overview_counts_devices_and_says_alerts_are_not_configured(client: TestClient) -> None:
    fleet(client, 3)
    fleet(client, 2, profile="arm64", prefix="a")
    sign_in(client)
    html = client.get("/ui/").text
    assert re.search(r'<tr data-profile="x86">.*?<td class="offline num"><a [^>]*>3</a>', html, re.S)
    assert re.search(r'<tr data-profile="arm64">.*?<td class="online num"><a [^>]*>0</a>', html, re.S)
    assert 'id="rollouts-active"' in html
    assert 'id="alerts-none"' in html  # the alerts package is there, and nothing fires


def test_release_pages_show_bundles_metrics_card_and_lineage(client: TestClient, make_bundle: BundleFactory) -> None:
    first = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    second = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    upload(client, make_bundle("1.1.0", "arm64"))
    sign_in(client)
    listing = client.get("/ui/releases").text
    assert f'data-release-id="{first}"' in listing and "arm64, x86" in listing
    page = client.get(f"/ui/releases/{second}")
    assert page.status_code == 200
    html = page.text
    assert (
        '<section class="bundle" data-profile="arm64"' in html and '<section class="bundle" data-profile="x86"' in html
    )
    assert '<tr data-metric="accuracy"><td>accuracy</td><td class="num">0.9</td>' in html
    assert "# card" in html and 'class="recipe"' in html
    assert re.search(rf'id="lineage-parent"><a href="/ui/releases/{first}">1.0.0</a>', html)
    assert client.get("/ui/releases/nope").status_code == 404
    assert client.get("/ui/releases?page=0").status_code == 400


def test_telemetry_page_charts_and_finds_the_drifted_feature(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rng = np.random.default_rng(3)
    reference, _ = _reference(rng)
    bundle = upload(client, make_bundle("1.0.0", "x86", reference=reference)).json()
    fleet(client, 2, prefix="cam")
    sender = Fleet(ctx, bundle["bundle_sha256"], rng)
    now = utcnow()
    for k in range(6):
        sender.send("cam000", now - timedelta(minutes=50 - 8 * k), n=400)
        sender.send("cam001", now - timedelta(minutes=49 - 8 * k), n=400)
    sign_in(client)
    page = client.get("/ui/telemetry?model=digits&version=1.0.0&hours=6")
    assert page.status_code == 200, error_message(page.text)
    html = page.text
    assert re.search(r'<path class="series series-0" data-series="1.0.0 x86" d="M', html)
    assert html.count('<path class="series') == 2  # latency and errors
    rows = re.findall(r'<tr data-feature="([^"]+)">', html)
    assert rows and rows[0] == f"x[{SHIFTED}]"  # the drifted feature comes first
    drifted = re.search(rf'<tr data-feature="x\[{SHIFTED}\]">(.*?)</tr>', html, re.S)
    assert drifted is not None and 'class="heat lvl-drift"' in drifted.group(1)
    stable = re.search(r'<tr data-feature="x\[0\]">(.*?)</tr>', html, re.S)
    assert stable is not None and "lvl-drift" not in stable.group(1)
    compare = client.get("/ui/telemetry?model=digits&version=1.0.0&compare=1.0.0&hours=24").text
    assert '<tr data-profile="x86" data-figure="requests">' in compare
    assert client.get("/ui/telemetry").status_code == 200  # defaults: the first model
    for bad in ("hours=5", "hours=0", "version=9.9.9", "model=%3Cx%3E"):
        assert client.get(f"/ui/telemetry?{bad}").status_code == 400, bad


def test_api_docs_load_only_packaged_assets(client: TestClient) -> None:
    for path, assets in (
        ("/docs", ("/ui/docs-assets/swagger-ui-bundle.js", "/ui/docs-assets/swagger-ui.css", "/ui/static/docs.js")),
        ("/redoc", ("/ui/docs-assets/redoc.standalone.js",)),
    ):
        html = client.get(path).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and all(r.startswith("/") for r in refs), refs  # nothing from another host
        for asset in assets:
            assert asset in refs
            resp = client.get(asset)
            assert resp.status_code == 200 and len(resp.content) > 400, asset
        assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/ui/docs-assets/../../etc/passwd").status_code == 404
    assert client.get("/ui/static/nothing.js").status_code == 404


def test_open_alerts_show_on_the_overview_and_telemetry_pages(client: TestClient, ctx: ServerContext) -> None:
    from ota_server.alerts.records import Alert

    with ctx.sessions() as session:
        for n, state in enumerate(("firing", "acknowledged", "resolved")):
            session.add(
                Alert(
                    id=f"al{n}",
                    fingerprint=f"fp{n}",
                    rule="drift-x",
                    kind="drift",
                    severity="warning",
                    state=state,
                    model_name="digits",
                    version="1.0.0",
                    hardware_profile="x86",
                    cohort="",
                    feature="x[3]",
                    features=[],
                    summary=f"x[3] drifted ({state})",
                    value=0.4,
                    threshold=0.25,
                    payload={},
                )
            )
        session.commit()
    sign_in(client)
    for page in ("/ui/", "/ui/telemetry?model=digits"):
        html = client.get(page).text
        assert set(re.findall(r'<tr data-alert-id="(al\d)"', html)) == {"al0", "al1"}, page  # resolved is not open


def test_charts_follow_new_windows_in_a_slot_already_shown(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    from ota_server.services.telemetry_aggregates import AggregationConfig
    from ota_server.web import telemetry_view as tv

    rng = np.random.default_rng(5)
    reference, _ = _reference(rng)
    bundle = upload(client, make_bundle("1.0.0", "x86", reference=reference)).json()
    fleet(client, 1, prefix="cam")
    sender = Fleet(ctx, bundle["bundle_sha256"], rng)
    edges = tv.slot_edges(6, AggregationConfig.from_settings(ctx.settings))
    start = edges[-2] + timedelta(seconds=1)  # the newest slot, cached once the chart has shown it
    sender.send("cam000", start, n=100)

    def requests_per_slot() -> list[int]:
        with ctx.sessions() as session:
            (series,) = tv.series(session, "digits", "", "", edges)
        return series.requests

    first = requests_per_slot()
    assert sum(first) == 100
    sender.send("cam000", start + timedelta(seconds=30), n=250)  # merged into the same aggregate row and slot
    assert sum(requests_per_slot()) == 350 and requests_per_slot() != first
