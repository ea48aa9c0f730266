"""API tokens (admin only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ota_server.api.deps import Admin, SessionDep
from ota_server.api.responses import TokenCreated
from ota_server.api.schemas import TokenCreate
from ota_server.services.tokens import create_token

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenCreated)
def create(body: TokenCreate, session: SessionDep, who: Admin) -> dict[str, Any]:
    """Create a token; the plaintext is returned only here, once."""
    token, plaintext = create_token(session, body.role, body.name, who.name)
    session.commit()
    return {"token_id": token.id, "role": token.role, "name": token.name, "token": plaintext}
