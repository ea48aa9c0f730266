"""The packager's reference stats and the agent's telemetry describe data the same way.

If they disagreed (feature indexing, bucket convention, confidence rule), every device would
report drift on perfectly ordinary inputs. A real CNN bundle ([N,1,8,8] input, logits output)
is packaged, installed in the agent's runtime, fed its own calibration data and then shifted
data; drift is measured with the contract's PSI exactly as the server computes it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from device_agent.serving.runtime import ModelRuntime, SessionCache, load_model
from device_agent.settings import AgentSettings
from device_agent.telemetry.recorder import TelemetryRecorder
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.telemetry import ReferenceStats, psi


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, SigningKey]:
    from packager.api import package_model
    from packager.examples.digits import build_digits_example
    from packager.request import PackageRequest

    root = tmp_path_factory.mktemp("cnn")
    key = SigningKey.generate()
    example = build_digits_example(root / "model", arch="cnn", epochs=3)
    report = package_model(
        PackageRequest(
            model=example.model_path,
            profiles=["x86-avx2"],
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=key,
            out_dir=root / "dist",
            name="digits-cnn",
            version="1.0.0",
            enforce_gates=False,  # a 3-epoch model: this test is about statistics, not accuracy
        )
    )
    result = report.results["x86-avx2"]
    assert result.bundle_path is not None, result
    return Path(result.bundle_path), example.calibration_path, key


def _window(bundle: Path, key: SigningKey, slot: Path, batches: list[dict[str, np.ndarray]], rate: float = 1.0):  # type: ignore[no-untyped-def]
    verified = verify_bundle(bundle, TrustedKeys([key.public_key]), extract_to=slot)
    runtime = ModelRuntime()
    recorder = TelemetryRecorder(feature_sample_rate=rate)
    runtime.add_listener(recorder.record)
    runtime.install(load_model(slot, verified.manifest, verified.archive_sha256, "a", SessionCache()))
    for batch in batches:
        runtime.predict(batch)
    [window] = recorder.roll()
    return window, ReferenceStats.model_validate_json((slot / "reference_stats.json").read_bytes())


def _psis(window, ref: ReferenceStats) -> list[float]:  # type: ignore[no-untyped-def]
    by_key = {(f.input, f.feature): f for f in window.features}
    values = []
    for feature in ref.features:
        seen = by_key[(feature.input, feature.feature)]
        assert seen.edges == feature.edges
        values.append(psi(feature.counts, seen.counts))
    return values


def test_reference_data_shows_no_drift_and_shifted_data_does(
    tmp_path: Path, cnn_bundle: tuple[Path, Path, SigningKey]
) -> None:
    bundle, calibration, key = cnn_bundle
    data = np.load(calibration)
    name = next(k for k in data.files if k != "labels")
    x = data[name].astype(np.float32)
    assert x.ndim == 4  # [N,1,8,8]: the case where "last axis" and "flattened" views differ

    same, ref = _window(bundle, key, tmp_path / "same", [{name: x[i : i + 16]} for i in range(0, len(x), 16)])
    assert len(ref.features) == 64 and all(f.feature is not None for f in ref.features)
    assert all(sum(f.counts) == len(x) for f in same.features)  # every pixel of every image was counted
    drift = _psis(same, ref)
    assert max(drift) < 0.1, max(drift)

    # Confidence histograms agree too: the same data gives (nearly) the same distribution.
    [out_ref] = ref.outputs
    [out_seen] = same.outputs
    assert out_ref.confidence_counts is not None and out_seen.confidence_counts is not None
    assert psi(out_ref.confidence_counts, out_seen.confidence_counts) < 0.1
    assert out_ref.class_counts is not None and out_seen.class_counts is not None
    assert psi(out_ref.class_counts, out_seen.class_counts) < 0.1

    shifted, _ = _window(
        bundle,
        key,
        tmp_path / "shifted",
        [{name: np.flip(x[i : i + 16], axis=3).copy() * 0.5 + 4} for i in range(0, len(x), 16)],
    )
    assert np.mean(_psis(shifted, ref)) > 0.25


def test_drift_is_seen_through_the_agents_default_feature_sample(
    tmp_path: Path, cnn_bundle: tuple[Path, Path, SigningKey]
) -> None:
    """With the agent's default sample (1/16 of requests), enough traffic (here 16 single-image passes over the
    calibration set, so about one pass is sampled) still tells reference data from shifted data, while counts
    and outputs cover every request."""
    bundle, calibration, key = cnn_bundle
    data = np.load(calibration)
    name = next(k for k in data.files if k != "labels")
    x = data[name].astype(np.float32)
    rate = AgentSettings().telemetry_feature_sample_rate
    assert rate < 1
    passes = [{name: x[i : i + 1]} for _ in range(16) for i in range(len(x))]
    random.seed(6)  # the sample is random: a fixed seed keeps the test from ever drawing a freak sample
    same, ref = _window(bundle, key, tmp_path / "same", passes, rate)
    assert same.request_count == len(passes) and same.feature_requests is not None
    assert 0.5 * len(x) < same.feature_requests < 1.5 * len(x)
    assert all(sum(f.counts) == same.feature_requests for f in same.features)
    assert same.outputs[0].class_counts is not None and sum(same.outputs[0].class_counts) == len(passes)
    assert max(_psis(same, ref)) < 0.1
    shifted_passes = [{name: np.flip(b[name], axis=3).copy() * 0.5 + 4} for b in passes]
    shifted, _ = _window(bundle, key, tmp_path / "shifted", shifted_passes, rate)
    assert np.mean(_psis(shifted, ref)) > 0.25
