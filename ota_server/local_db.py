"""The server's database opened by a command that runs beside the server (``edgeota broker config``), not by it.

Such a command must find the database the server made: a SQLite file that does not exist means the settings
name another data folder than the server's (or the server never ran), and creating an empty database there
would only hide that. :func:`open_server_database` refuses that case in one line, and turns any failure to open
or migrate the database into one line too (SQLAlchemy's own message, without its traceback).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from edgeota_contract.errors import ContractError
from edgeota_contract.states import ReasonCode
from ota_server.core.config import Settings
from ota_server.db import make_engine, upgrade_to_head


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another database or an in-memory one)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_server_database(settings: Settings) -> Engine:
    """An engine on the server's existing database, migrated to the current schema. Dispose of it after use.

    Raises:
        ContractError: the SQLite database file (or its data folder) does not exist, or the database cannot be
            opened or migrated; one line naming the place and what to do.
    """
    url = settings.resolved_database_url
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        where = (
            f"the data folder {settings.data_dir} does not exist"
            if settings.database_url is None and not settings.data_dir.is_dir()
            else f"{path} does not exist"
        )
        raise ContractError(
            f"no server database: {where}; run this with the server's settings (--config or EDGEOTA_SERVER_DATA_DIR / "
            "EDGEOTA_SERVER_DATABASE_URL), or start `edgeota server run` once to create it",
            ReasonCode.MALFORMED_MESSAGE,
        )
    engine = make_engine(url)
    try:
        upgrade_to_head(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise database_error(exc) from None
    return engine


def database_error(exc: SQLAlchemyError) -> ContractError:
    """One line for a database failure: the driver's first line, without SQLAlchemy's background link."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return ContractError(f"cannot use the server database: {first}", ReasonCode.INTERNAL_ERROR)
