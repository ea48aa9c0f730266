"""The pass interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import onnx
from pydantic import BaseModel, ConfigDict

from edgeota_contract.manifest import PassRecord
from packager.errors import PackagerError


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=PassConfig)


class PassFailed(PackagerError):
    """A pass could not produce a model for this recipe (the ladder moves on).

    ``details`` holds what the pass measured before failing, for the report (e.g. a search's steps).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.details: dict[str, Any] | None = None


@dataclass
class PassContext:
    """What a pass may read besides the model: a scratch folder, data, and a logger."""

    work_dir: Path
    calibration: Any = None  # packager.data.Dataset
    log: Callable[[str], None] = field(default=lambda _msg: None)
    # Accuracy-aware passes (mixed precision) ask this whether a candidate passes the quality gates.
    judge: Callable[[onnx.ModelProto], Verdict] | None = None


@dataclass(frozen=True)
class Verdict:
    """A candidate judged by the quality gates: passed or not, the gated figures, and why it failed."""

    ok: bool
    metrics: dict[str, float]
    detail: str = ""


class Pass(ABC, Generic[C]):
    name: ClassVar[str]

    def __init__(self, config: C) -> None:
        self.config = config
        self.notes: dict[str, Any] = {}

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto: ...

    def record(self) -> PassRecord:
        cfg = self.config.model_dump(mode="json")
        if self.notes:
            cfg = {**cfg, "result": self.notes}
        return PassRecord(name=self.name, config=cfg)
