"""Contract: feedback messages on their own channel, and the confidence calibration's rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeota_contract.calibration import (
    OutputCalibration,
    aligned,
    bin_accuracy,
    bin_midpoints,
    expected_accuracy,
)
from edgeota_contract.errors import ContractError
from edgeota_contract.messages import FeedbackItem, FeedbackReport, parse_device_message
from edgeota_contract.telemetry import CONFIDENCE_EDGES
from edgeota_contract.topics import Channel, mosquitto_acl_patterns, server_subscriptions

SHA = "b" * 64
BINS = len(CONFIDENCE_EDGES) + 1


def _item(**kw: object) -> FeedbackItem:
    fields: dict[str, object] = dict(prediction_id="p1", model_name="digits", version="1.0.0", bundle_sha256=SHA)
    fields.update(kw)
    return FeedbackItem(**fields)  # type: ignore[arg-type]


def test_feedback_report_round_trip_on_its_channel() -> None:
    msg = FeedbackReport(
        boot_id="b", seq=3, items=[_item(label="3", predicted="3"), _item(prediction_id="p2", reward=0.5)]
    )
    parsed = parse_device_message(Channel.FEEDBACK, msg.model_dump_json().encode())
    assert parsed == msg
    with pytest.raises(ContractError, match="feedback message on the telemetry channel"):
        parse_device_message(Channel.TELEMETRY, msg.model_dump_json().encode())
    assert any(s.endswith("/+/feedback") for s in server_subscriptions())
    assert "pattern write edgeota/v1/devices/%u/feedback" in mosquitto_acl_patterns()


@pytest.mark.parametrize(
    "kw",
    [
        {},  # neither label nor reward
        {"label": ""},
        {"label": "x" * 129},
        {"reward": -0.1},
        {"reward": 1.1},
        {"label": "1", "confidence": 1.5},
        {"label": "1", "row": -1},
        {"label": "1", "prediction_id": "has space"},
        {"label": "1", "bundle_sha256": "short"},
        {"label": "1", "extra": 1},
        {"label": "1", "version": "1.0.0-" + "a" * 130},  # longer than the stored column
    ],
)
def test_bad_feedback_items(kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _item(**kw)


def test_report_needs_items() -> None:
    with pytest.raises(ValidationError):
        FeedbackReport(boot_id="b", seq=0, items=[])


def _cal(counts: list[int], correct: list[int]) -> OutputCalibration:
    return OutputCalibration(output="y", edges=list(CONFIDENCE_EDGES), counts=counts, correct=correct)


def test_calibration_shape_is_checked() -> None:
    with pytest.raises(ValidationError):
        _cal([1] * (BINS - 1), [0] * (BINS - 1))
    with pytest.raises(ValidationError):
        _cal([1] * BINS, [2] * BINS)  # more correct than rows
    with pytest.raises(ValidationError):
        OutputCalibration(output="y", edges=[0.5, 0.2], counts=[0, 0, 0], correct=[0, 0, 0])


def test_bin_accuracy_leans_on_confidence_where_data_is_thin() -> None:
    counts, correct = [0] * BINS, [0] * BINS
    counts[-1], correct[-1] = 999, 999
    cal = _cal(counts, correct)
    mids = bin_midpoints(CONFIDENCE_EDGES)
    assert mids[0] == pytest.approx(0.05) and mids[-1] == pytest.approx(0.995)
    probs = bin_accuracy(cal)
    assert probs[3] == pytest.approx(mids[3])  # no evaluation rows: the confidence itself
    assert probs[-1] == pytest.approx((999 + 0.995) / 1000)
    observed = [0] * BINS
    observed[-1], observed[3] = 30, 10
    est, n = expected_accuracy(cal, observed)
    assert n == 40 and est == pytest.approx((30 * probs[-1] + 10 * probs[3]) / 40)
    assert expected_accuracy(cal, [0] * BINS) == (None, 0)
    assert expected_accuracy(cal, [1] * (BINS + 1)) == (None, 0)
    assert aligned(cal) and not aligned(OutputCalibration(output="y", edges=[0.5], counts=[1, 1], correct=[0, 1]))
