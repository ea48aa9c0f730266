"""Overview, releases, audit log pages, and the dashboard's own 404 for unknown ``/ui`` paths."""

from __future__ import annotations

import re
import tarfile
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select

from ota_server.errors import NotFound
from ota_server.models import AuditEntry, Bundle, Deployment, Release
from ota_server.services.audit import query as audit_query
from ota_server.web import fleet_view, retraining_view
from ota_server.web.render import Ctx, UiError, UiRoute, User, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)
PAGE = 50
_WORD = r"^[A-Za-z0-9_.:-]{0,128}$"


@router.get("/ui/")
def overview(request: Request, ctx: Ctx, user: User) -> HTMLResponse:
    timeout = ctx.settings.device_heartbeat_timeout_seconds
    with ctx.sessions() as session:
        by_profile = fleet_view.devices_by_profile(session, timeout)
        by_version = fleet_view.devices_by_version(session, timeout)
        rollouts = fleet_view.active_rollouts(session)
        alerts = retraining_view.open_alerts(session)
        releases = {
            r.id: r for r in session.scalars(select(Release).where(Release.id.in_({r.release_id for r in rollouts})))
        }
    return render(
        request,
        "overview.html",
        page_name="overview",
        by_profile=by_profile,
        by_version=by_version,
        rollouts=rollouts,
        releases=releases,
        alerts=alerts,
        totals={
            "devices": sum(p["total"] for p in by_profile),
            "online": sum(p["online"] for p in by_profile),
        },
    )


@router.get("/ui/releases")
def release_list(
    request: Request, ctx: Ctx, user: User, page: Annotated[int, Query(ge=1, le=100_000)] = 1
) -> HTMLResponse:
    with ctx.sessions() as session:
        total = int(session.scalar(select(func.count()).select_from(Release)) or 0)
        rows = session.execute(
            select(Release.id, Release.model_name, Release.version, Release.created_at, Release.created_by)
            .order_by(Release.created_at.desc(), Release.id)
            .offset((page - 1) * PAGE)
            .limit(PAGE)
        ).all()
        ids = [r.id for r in rows]
        profiles: dict[str, list[str]] = {}
        if ids:
            for rid, profile in session.execute(
                select(Bundle.release_id, Bundle.hardware_profile)
                .where(Bundle.release_id.in_(ids))
                .order_by(Bundle.hardware_profile)
            ):
                profiles.setdefault(rid, []).append(profile)
    return render(
        request,
        "releases.html",
        page_name="releases",
        rows=rows,
        profiles=profiles,
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE)),
    )


_CARD_MAX = 64 * 1024


def model_card(store: Any, sha256: str) -> str | None:
    """The bundle's ``model_card.md`` as text (None when the bundle file or the card is missing)."""
    try:
        with tarfile.open(store.local_path(sha256), mode="r:") as tar:
            member = tar.extractfile("model_card.md")
            return None if member is None else member.read(_CARD_MAX).decode("utf-8", "replace")
    except (OSError, KeyError, tarfile.TarError):
        return None


def card_attempts(card: str | None) -> list[list[str]]:
    """The ladder's attempts from the card's "| attempt | result | failed gates |" table (the packager writes it)."""
    if not card:
        return []
    rows: list[list[str]] = []
    in_table = False
    for line in card.splitlines():
        if line.startswith("| attempt |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells and not re.match(r"^-+$", cells[0]):
                rows.append(cells)
    return rows


@router.get("/ui/releases/{release_id}")
def release_page(
    request: Request, ctx: Ctx, user: User, release_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
) -> HTMLResponse:
    with ctx.sessions() as session:
        release = session.get(Release, release_id)
        if release is None:
            raise NotFound(f"release {release_id} not found")
        bundles = list(
            session.scalars(select(Bundle).where(Bundle.release_id == release_id).order_by(Bundle.hardware_profile))
        )
        parent_rows = session.execute(
            select(Release.id, Release.version)
            .where(Release.model_name == release.model_name, Release.created_at < release.created_at)
            .order_by(Release.created_at.desc())
            .limit(1)
        ).first()
        evaluations = retraining_view.evaluations(session, release_id=release_id)
        rollouts = (
            session.execute(
                select(Deployment.rollout_id, func.count())
                .where(Deployment.bundle_sha256.in_([b.sha256 for b in bundles]), Deployment.rollout_id.is_not(None))
                .group_by(Deployment.rollout_id)
            ).all()
            if bundles
            else []
        )
    cards = {b.sha256: model_card(ctx.store, b.sha256) for b in bundles}
    return render(
        request,
        "release.html",
        page_name="release",
        release=release,
        bundles=bundles,
        cards=cards,
        attempts={sha: card_attempts(card) for sha, card in cards.items()},
        previous=parent_rows,
        evaluations=evaluations,
        rollouts=rollouts,
    )


@router.get("/ui/audit")
def audit_list(
    request: Request,
    ctx: Ctx,
    user: User,
    entity_type: Annotated[str, Query(pattern=_WORD)] = "",
    entity_id: Annotated[str, Query(pattern=_WORD)] = "",
    action: Annotated[str, Query(pattern=_WORD)] = "",
    actor: Annotated[str, Query(max_length=128)] = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    with ctx.sessions() as session:
        stmt = select(func.count()).select_from(AuditEntry)
        for column, value in (
            (AuditEntry.entity_type, entity_type),
            (AuditEntry.entity_id, entity_id),
            (AuditEntry.action, action),
            (AuditEntry.actor, actor),
        ):
            if value:
                stmt = stmt.where(column == value)
        total = int(session.scalar(stmt) or 0)
        # Newest first: the last page of the service's oldest-first order, read backwards.
        pages = max(1, -(-total // PAGE))
        start = max(0, total - page * PAGE)
        count = min(PAGE, total - (page - 1) * PAGE)
        entries = (
            list(
                reversed(
                    audit_query(
                        session,
                        actor=actor or None,
                        action=action or None,
                        entity_type=entity_type or None,
                        entity_id=entity_id or None,
                        limit=max(0, count),
                        offset=start,
                    )
                )
            )
            if count > 0
            else []
        )
        rollout_of = _rollout_links(session, entries)
    return render(
        request,
        "audit.html",
        page_name="audit",
        entries=entries,
        rollout_of=rollout_of,
        total=total,
        page=page,
        pages=pages,
        filters={"entity_type": entity_type, "entity_id": entity_id, "action": action, "actor": actor},
    )


def _rollout_links(session: Any, entries: list[AuditEntry]) -> dict[int, str]:
    """Per audit entry id, the rollout it concerns (the rollout itself, or the rollout of a deployment)."""
    out = {e.id: e.entity_id for e in entries if e.entity_type == "rollout"}
    dep_ids = {e.entity_id for e in entries if e.entity_type == "deployment"}
    if dep_ids:
        owners = dict(
            session.execute(select(Deployment.id, Deployment.rollout_id).where(Deployment.id.in_(dep_ids))).all()
        )
        for e in entries:
            if e.entity_type == "deployment" and owners.get(e.entity_id):
                out[e.id] = owners[e.entity_id]
    return out


@router.get("/ui/audit/{entry_id}")
def audit_entry(request: Request, ctx: Ctx, user: User, entry_id: Annotated[int, Path(ge=1, le=2**62)]) -> HTMLResponse:
    with ctx.sessions() as session:
        entry = session.get(AuditEntry, entry_id)
        if entry is None:
            raise NotFound(f"audit entry {entry_id} not found")
        rollout_of = _rollout_links(session, [entry])
    return render(request, "audit_entry.html", page_name="audit_entry", e=entry, rollout_id=rollout_of.get(entry.id))


@router.get("/ui/{rest:path}")
def not_found(rest: str) -> HTMLResponse:
    raise UiError(404, f"no dashboard page /ui/{rest}")
