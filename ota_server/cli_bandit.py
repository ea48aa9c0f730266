"""The bandit parts of ``edgeota rollout create`` and ``edgeota rollout status`` (stdlib, rich and the contract only).

``rollout create --strategy bandit --release A --release B ...`` sends ``release_id`` A and ``arms`` [B, ...]
with a ``bandit`` section built from the ``--bandit-*`` options; ``rollout status`` prints one row per arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import RenderableType

from edgeota_contract import tables as tb
from edgeota_contract.tables import Col

if TYPE_CHECKING:
    from ota_server.api.responses import RolloutStatus


def bandit_request(
    releases: Sequence[str],
    strategy: str,
    *,
    floor: float,
    interval: float,
    max_moves: int,
    draws: int,
    seed: int,
    win_probability: float,
    win_hold: float,
    until_stopped: bool,
) -> dict[str, Any]:
    """The request fields for the releases after the first (``arms``) and, for ``bandit``, the allocation.

    Several releases with another strategy are sent as they are: the server refuses them with one line.
    """
    out: dict[str, Any] = {"arms": list(releases[1:])} if len(releases) > 1 or strategy == "bandit" else {}
    if strategy == "bandit":
        out["bandit"] = {
            "floor": floor,
            "interval_seconds": interval,
            "max_moves": max_moves,
            "draws": draws,
            "seed": seed,
            "win_probability": None if until_stopped else win_probability,
            "win_hold_seconds": win_hold,
        }
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def bandit_renderables(r: RolloutStatus) -> list[RenderableType]:
    """One table row per arm of a bandit rollout (nothing for another rollout)."""
    if r.bandit is None:
        return []
    b = r.bandit
    winner = f", winner {b.winner_release_id}" if b.winner_release_id else ""
    rows = []
    for arm in b.arms:
        p = arm.posterior
        interval = "-" if p.low is None or p.high is None else f"{p.low:.3f}-{p.high:.3f}"
        rows.append(
            (
                arm.version,
                arm.state if not arm.reason else f"{arm.state} ({arm.reason})",
                arm.devices,
                arm.in_progress,
                arm.failed,
                _pct(arm.share),
                _pct(arm.target_share),
                "-" if arm.prob_best is None else f"{arm.prob_best:.3f}",
                arm.rewards,
                f"{p.mean:.3f}",
                interval,
            )
        )
    columns = [
        "arm",
        "state",
        Col("devices", right=True),
        Col("moving", right=True),
        Col("failed", right=True),
        Col("share", right=True),
        Col("target", right=True),
        Col("P(best)", right=True),
        Col("rewards", right=True),
        Col("mean", right=True),
        "95% interval",
    ]
    title = f"bandit arms (step {b.steps}, {b.moved_by_steps} devices moved by steps{winner})"
    return [tb.table(columns, rows, title=title)]
