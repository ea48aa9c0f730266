"""Inference with ONNX Runtime: a session cache shared per bundle digest, and hot swap.

:class:`ModelRuntime` holds the serving model as one immutable :class:`LoadedModel` reference.
:meth:`ModelRuntime.predict` reads that reference once and runs on it, so a swap
(:meth:`ModelRuntime.install`) never fails or drops a request: requests that started on the old
model finish on it, and the old session stays alive until the last of them is done.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from device_agent._lazy import lazy_module
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import MODEL_FILE, BundleManifest, TensorSpec
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
_clock = time.perf_counter_ns
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}


class ModelError(EdgeotaError):
    """A model cannot be loaded, has the wrong signature, or failed a request."""

    default_reason = ReasonCode.LOAD_FAILED


class NoModelError(ModelError):
    """No model is installed yet."""


def _ort() -> Any:
    # Imported on first use: an agent with no model yet stays ~25 MB smaller.
    import onnxruntime

    return onnxruntime


def providers_for(manifest: BundleManifest) -> list[str]:
    """The manifest's execution provider when this ONNX Runtime has it, then CPU as the fallback."""
    available = _ort().get_available_providers()
    wanted = manifest.execution_provider
    chosen = [wanted] if wanted in available and wanted != "CPUExecutionProvider" else []
    return [*chosen, "CPUExecutionProvider"]


class SessionCache:
    """ONNX Runtime sessions keyed by bundle digest, shared by every agent that is given the same cache.

    Thread-safe; keeps at most ``max_entries`` sessions (least recently used are dropped from
    the cache, while anyone still holding one keeps using it).
    """

    def __init__(self, max_entries: int = 16, intra_op_threads: int = 1) -> None:
        self._max = max_entries
        self._threads = intra_op_threads
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, digest: str, model_path: Path, providers: list[str]) -> Any:
        """The session for ``digest``, loading ``model_path`` once. Raises ModelError(load_failed)."""
        with self._lock:
            if digest in self._sessions:
                self._sessions.move_to_end(digest)
                return self._sessions[digest]
            gate = self._loading.setdefault(digest, threading.Lock())
        with gate:
            with self._lock:
                if digest in self._sessions:
                    return self._sessions[digest]
            ort = _ort()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
            try:
                session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own exception types
                raise ModelError(f"model does not load: {str(exc)[:300]}", ReasonCode.LOAD_FAILED) from exc
            with self._lock:
                self._sessions[digest] = session
                self._loading.pop(digest, None)
                while len(self._sessions) > self._max:
                    self._sessions.popitem(last=False)
            return session

    def discard(self, digest: str) -> None:
        with self._lock:
            self._sessions.pop(digest, None)


def _norm_dtype(name: str) -> str:
    return _ALIASES.get(name, name)


def _check_specs(kind: str, specs: list[TensorSpec], actual: list[Any]) -> None:
    if [s.name for s in specs] != [a.name for a in actual]:
        raise ModelError(
            f"model {kind}s {[a.name for a in actual]} differ from the manifest's {[s.name for s in specs]}",
            ReasonCode.IO_SIGNATURE_MISMATCH,
        )
    for spec, arg in zip(specs, actual, strict=True):
        dtype = _ORT_DTYPES.get(arg.type, arg.type)
        if dtype != _norm_dtype(spec.dtype):
            raise ModelError(
                f"{kind} {spec.name} is {dtype}, the manifest says {spec.dtype}", ReasonCode.IO_SIGNATURE_MISMATCH
            )
        shape = list(arg.shape)
        if len(shape) != len(spec.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, spec.shape, strict=True)
        ):
            raise ModelError(
                f"{kind} {spec.name} has shape {shape}, the manifest says {spec.shape}",
                ReasonCode.IO_SIGNATURE_MISMATCH,
            )


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle's model, ready to serve. Immutable; shared by readers during a swap."""

    manifest: BundleManifest
    bundle_sha256: str
    slot: str
    folder: Path
    session: Any  # onnxruntime.InferenceSession
    # Fixed at construction: the request path reads them instead of rebuilding lists from the manifest
    # (that, a feed dict, np.asarray per output and ORT's Python-side checks cost ~3 us of a ~17 us
    # digits-CNN inference on the development box).
    _inputs: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _outputs: list[str] = field(init=False, repr=False, compare=False)  # a list: ORT's native run takes no tuple
    _input_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _run: Callable[[list[str], dict[str, Any], Any], list[Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs", tuple(s.name for s in self.manifest.inputs))
        object.__setattr__(self, "_outputs", [s.name for s in self.manifest.outputs])
        object.__setattr__(self, "_input_set", frozenset(self._inputs))
        object.__setattr__(self, "_run", _direct_run(self.session))

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request: every manifest output, by name. Raises ModelError(health_failed) on a missing
        input or a runtime error. Extra keys in ``inputs`` are ignored."""
        # The usual request names exactly the model's inputs: hand it to ORT as it is.
        feeds = inputs if inputs.keys() == self._input_set else self._feeds(inputs)
        try:
            outs = self._run(self._outputs, feeds, None)
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"inference failed: {str(exc)[:300]}", ReasonCode.HEALTH_FAILED) from exc
        return dict(zip(self._outputs, outs, strict=True))

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise ModelError(f"missing inputs: {', '.join(missing)}", ReasonCode.HEALTH_FAILED)
        return {n: inputs[n] for n in self._inputs}


def _direct_run(session: Any) -> Callable[[list[str], dict[str, Any], Any], list[Any]]:
    """The session's native ``run(output_names, feeds, run_options)``, past ``InferenceSession.run``'s
    per-call Python checks (input names, which :meth:`LoadedModel.run` has checked; OrtValue ownership
    and graph capture, which numpy feeds never need). Falls back to the public ``run`` for anything
    that is not an ONNX Runtime session (or a future one without the native handle). The one thing
    lost is the public wrapper's provider fallback on an execution-provider failure: such a request
    fails (ModelError), and the health window judges the model."""
    native = getattr(session, "_sess", None)
    run = getattr(native, "run", None)
    return run if callable(run) else session.run  # type: ignore[no-any-return]


def load_model(
    folder: Path, manifest: BundleManifest, bundle_sha256: str, slot: str, cache: SessionCache
) -> LoadedModel:
    """Load the model in ``folder`` and check its inputs and outputs against the manifest.

    Raises:
        ModelError: ``load_failed`` or ``io_signature_mismatch``.
    """
    session = cache.get(bundle_sha256, folder / MODEL_FILE, providers_for(manifest))
    try:
        _check_specs("input", manifest.inputs, session.get_inputs())
        _check_specs("output", manifest.outputs, session.get_outputs())
    except ModelError:
        cache.discard(bundle_sha256)
        raise
    return LoadedModel(manifest, bundle_sha256, slot, folder, session)


Listener: TypeAlias = "Callable[[LoadedModel, dict[str, np.ndarray], dict[str, np.ndarray] | None, int], None]"
"""Called after every request with (model, inputs, outputs or None on error, latency in ns)."""


class ModelRuntime:
    """The serving model of one agent, with lock-free reads and atomic hot swap."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._listeners: list[Listener] = []

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def add_listener(self, listener: Listener) -> None:
        self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [x for x in self._listeners if x is not listener]

    def install(self, model: LoadedModel | None) -> LoadedModel | None:
        """Make ``model`` serve new requests; returns the model it replaced. In-flight requests finish."""
        old, self._current = self._current, model
        return old

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request on the serving model.

        Raises:
            NoModelError: nothing is installed yet.
            ModelError: bad inputs or an inference failure (counted as an error in telemetry).
        """
        return self.predict_on(self._current, inputs)

    def predict_on(self, model: LoadedModel | None, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request on ``model``, a value of :attr:`current` the caller read (so it knows which release
        answered, even across a swap); listeners see it exactly as a :meth:`predict`. Raises as :meth:`predict`."""
        if model is None:
            raise NoModelError("no model installed", ReasonCode.LOAD_FAILED)
        started = _clock()
        outputs: dict[str, np.ndarray] | None = None
        try:
            outputs = model.run(inputs)
            return outputs
        finally:
            latency_ns = _clock() - started
            for listener in self._listeners:
                listener(model, inputs, outputs, latency_ns)
