"""Request dependencies: the server context, a database session, and who is calling."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from ota_server.context import ServerContext
from ota_server.core.security import Role
from ota_server.errors import PermissionDenied, Unauthenticated
from ota_server.services.tokens import Principal, authenticate

# Dependencies are async (run on the event loop) because FastAPI runs every sync dependency in
# the thread pool, and those hops cost more than the work they do.


async def get_ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


async def get_session(ctx: Annotated[ServerContext, Depends(get_ctx)]) -> AsyncIterator[Session]:
    """One session per request (it connects lazily); committed by the route, rolled back on any error."""
    with ctx.sessions() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


CtxDep = Annotated[ServerContext, Depends(get_ctx)]
SessionDep = Annotated[Session, Depends(get_session)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing bearer token")
    return token.strip()


async def principal(request: Request, ctx: CtxDep) -> Principal:
    token = _bearer(request)
    admin = ctx.settings.admin_token.get_secret_value() if ctx.settings.admin_token else None
    with ctx.sessions() as session:
        who = authenticate(session, token, admin)
    if who is None:
        raise Unauthenticated("invalid token")
    return who


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """Dependency: an API token with at least ``role`` (devices are refused)."""

    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role is None or not who.role.allows(role):
            raise PermissionDenied(f"this call needs the {role.value} role")
        return who

    return check


async def device_or_viewer(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """Downloads: any device token or an API token of at least viewer."""
    return who


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
ReleaseManager = Annotated[Principal, Depends(require(Role.RELEASE_MANAGER))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
AnyCaller = Annotated[Principal, Depends(device_or_viewer)]
