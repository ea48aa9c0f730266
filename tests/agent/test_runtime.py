"""Hot swap under concurrent load: no failed or dropped request; the session cache is shared per digest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.serving.runtime import LoadedModel, ModelError, ModelRuntime, NoModelError, SessionCache, load_model
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import TrustedKeys
from tests.agent.bundles import make_bundle, reference_model, sample_inputs
from tests.agent.conftest import Keys


@pytest.fixture
def loaded(tmp_path: Path, keys: Keys) -> Callable[[int, SessionCache], LoadedModel]:
    trusted = TrustedKeys([keys.release.public_key])

    def load(seed: int, cache: SessionCache) -> LoadedModel:
        path, sha = make_bundle(tmp_path / f"b{seed}.tar", keys.release, version=f"1.{seed}.0", seed=seed)
        folder = tmp_path / f"slot{seed}"
        if not folder.exists():
            verify_bundle(path, trusted, extract_to=folder)
        v = verify_bundle(path, trusted)
        return load_model(folder, v.manifest, sha, f"s{seed}", cache)

    return load


def test_hot_swap_under_load_drops_nothing(loaded: Callable[[int, SessionCache], LoadedModel]) -> None:
    cache = SessionCache()
    models = [loaded(0, cache), loaded(1, cache)]
    runtime = ModelRuntime()
    runtime.install(models[0])
    x = sample_inputs(8)
    expected = {m.manifest.version: reference_model(x, seed=i) for i, m in enumerate(models)}
    served: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                out = runtime.predict({"x": x})["y"]
            except BaseException as exc:
                failures.append(exc)
                return
            # every answer is a complete answer of exactly one of the two models
            match = [v for v, y in expected.items() if np.allclose(out, y, atol=1e-4)]
            with lock:
                served.append(match[0] if len(match) == 1 else "mixed")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(40):
        runtime.install(models[(i + 1) % 2])
        threading.Event().wait(0.005)
    stop.set()
    for t in threads:
        t.join(10)
    assert failures == []
    assert "mixed" not in served
    assert set(served) == {"1.0.0", "1.1.0"}


def test_cache_shares_sessions_per_digest(loaded: Callable[[int, SessionCache], LoadedModel]) -> None:
    cache = SessionCache()
    a, b = loaded(0, cache), loaded(0, cache)
    assert a.session is b.session


def test_predict_errors(loaded: Callable[[int, SessionCache], LoadedModel]) -> None:
    runtime = ModelRuntime()
    with pytest.raises(NoModelError):
        runtime.predict({"x": sample_inputs()})
    seen: list[bool] = []
    runtime.add_listener(lambda model, inputs, outputs, ms: seen.append(outputs is None))
    runtime.install(loaded(0, SessionCache()))
    with pytest.raises(ModelError, match="missing inputs"):
        runtime.predict({"nope": sample_inputs()})
    with pytest.raises(ModelError, match="inference failed"):
        runtime.predict({"x": np.zeros((2, 3), dtype=np.float32)})
    runtime.predict({"x": sample_inputs()})
    assert seen == [True, True, False]


def test_run_matches_the_public_session_api(loaded: Callable[[int, SessionCache], LoadedModel]) -> None:
    """The request path calls ORT's native run (past InferenceSession.run's per-call checks): same outputs as
    the public API, extra input keys ignored, bad dtypes and wrong input names still refused as ModelError."""
    model = loaded(0, SessionCache())
    x = sample_inputs(5, seed=3)
    [public] = model.session.run(None, {"x": x})
    got = model.run({"x": x})
    assert list(got) == model.output_names and np.array_equal(got["y"], public)
    assert np.allclose(got["y"], reference_model(x, seed=0), atol=1e-5)
    assert np.array_equal(model.run({"x": x, "unused": np.zeros(1)})["y"], public)
    with pytest.raises(ModelError, match="inference failed"):
        model.run({"x": x.astype(np.float64)})
    with pytest.raises(ModelError, match="missing inputs: x"):
        model.run({"y": x, "z": x})
    with pytest.raises(ModelError, match="missing inputs: x"):
        model.run({})


def test_run_falls_back_to_the_public_api_without_a_native_session(
    loaded: Callable[[int, SessionCache], LoadedModel],
) -> None:
    real = loaded(0, SessionCache())
    calls: list[list[str]] = []

    class Wrapped:  # not an ORT session: only the public run(output_names, feeds, run_options)
        def run(self, names: list[str], feeds: dict[str, np.ndarray], options: object = None) -> list[np.ndarray]:
            calls.append(list(names))
            return list(real.session.run(names, feeds))

    model = LoadedModel(real.manifest, real.bundle_sha256, real.slot, real.folder, Wrapped())
    assert np.array_equal(model.run({"x": sample_inputs()})["y"], real.run({"x": sample_inputs()})["y"])
    assert calls == [["y"]]
