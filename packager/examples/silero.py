"""silero-vad, a real voice-activity model, as an unlabelled packaging example.

The ``silero-vad`` wheel from PyPI ships ONNX files; two are used here, read from the installed
package with :mod:`importlib.resources` (nothing is downloaded at run time):

- ``static``: ``silero_vad_openvino_16k.onnx``. 16 kHz only, static shapes, no control flow:
  inputs ``input`` ``[1, 576]`` (512 new samples after 64 samples of context) and ``state``
  ``[2, 1, 128]`` (the LSTM state), outputs ``output`` ``[1, 1]`` (speech probability) and
  ``stateN``.
- ``control_flow``: ``silero_vad.onnx``, the default model. Its whole network sits inside nested
  ``If`` subgraphs chosen by the sample-rate input ``sr`` (a scalar int64); batch is dynamic and
  the state is ``[2, batch, 128]``.

No labels exist, so packaging gates on fidelity against fp32 (top-1 = the 0.5 speech decision,
cosine and SQNR over all outputs). Calibration and evaluation audio is synthetic and
deterministic (:func:`synthetic_audio`): voiced segments (a pitch-gliding harmonic series with
syllable-rate amplitude modulation, i.e. sums of sines), silences, and white and pink-ish noise.
Each clip is streamed through the fp32 model chunk by chunk, as a real VAD runs, so the
``state`` fed with each chunk is the state the model really has at that point.

Files written by :func:`build_silero_example`: ``silero-{variant}.onnx`` (a copy of the
wheel's file), ``calibration.npz`` and ``eval.npz`` with ``input`` ``[N, 576]``, ``state``
``[2, N, 128]`` (samples on axis 1, as the model batches) and, for ``control_flow``, ``sr``
(a scalar, 16000).
"""

from __future__ import annotations

import importlib.resources
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from packager.errors import ModelInputError

SAMPLE_RATE = 16_000
CHUNK = 512
CONTEXT = 64
STATE_SHAPE = (2, 1, 128)
VARIANT_FILES = {"static": "silero_vad_openvino_16k.onnx", "control_flow": "silero_vad.onnx"}
Variant = Literal["static", "control_flow"]


@dataclass(frozen=True)
class SileroExample:
    model_path: Path
    calibration_path: Path
    eval_path: Path
    variant: str
    speech_share: float  # share of evaluation chunks the fp32 model calls speech (p >= 0.5)


def silero_model_path(variant: Variant) -> Path:
    """The installed wheel's ONNX file for ``variant``.

    Raises:
        ModelInputError: the ``silero-vad`` package is not installed, or lacks the file.
    """
    try:
        root = importlib.resources.files("silero_vad") / "data"
    except ModuleNotFoundError:
        raise ModelInputError("the silero-vad package is not installed (pip install --no-deps silero-vad)") from None
    path = Path(str(root / VARIANT_FILES[variant]))
    if not path.is_file():
        raise ModelInputError(f"the installed silero-vad package lacks {VARIANT_FILES[variant]}")
    return path


def synthetic_audio(seconds: float, seed: int) -> np.ndarray:
    """Deterministic 16 kHz float32 audio in [-1, 1]: voiced segments, silence and noise.

    Voiced segments are harmonic series (fundamental 90-260 Hz gliding over the segment, 8
    harmonics with a falling envelope) amplitude-modulated at a syllable rate of 3-6 Hz; the rest
    is quiet or louder noise (white, and low-passed "pink-ish"). The same seed gives the same clip.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, dtype=np.float64)
    pos = 0
    while pos < n:
        length = min(n - pos, int(rng.uniform(0.3, 1.5) * SAMPLE_RATE))
        t = np.arange(length) / SAMPLE_RATE
        kind = rng.choice(["voice", "voice", "silence", "noise"])
        if kind == "voice":
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            seg = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**1.2 for k in range(1, 9))
            envelope = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * t))
            seg = rng.uniform(0.1, 0.5) * envelope * seg / 2.5
        elif kind == "noise":
            white = rng.standard_normal(length)
            pinkish = np.convolve(white, np.ones(8) / 8, mode="same")
            seg = rng.uniform(0.01, 0.1) * (pinkish if rng.random() < 0.5 else white)
        else:
            seg = np.zeros(length)
        out[pos : pos + length] = seg + 0.003 * rng.standard_normal(length)
        pos += length
    return np.clip(out, -1, 1).astype(np.float32)


def stream_chunks(model_path: Path, audio: np.ndarray, with_sr: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the fp32 model over ``audio`` chunk by chunk; return (inputs ``[N, 576]``, states ``[2, N, 128]``, probs).

    Each row's state is the model's state before that chunk (zeros for the first chunk).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    state = np.zeros(STATE_SHAPE, dtype=np.float32)
    context = np.zeros(CONTEXT, dtype=np.float32)
    rows, states, probs = [], [], []
    for start in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[start : start + CHUNK]])[None, :]
        feed = {"input": x, "state": state}
        if with_sr:
            feed["sr"] = np.array(SAMPLE_RATE, dtype=np.int64)
        prob, new_state = session.run(["output", "stateN"], feed)
        rows.append(x[0])
        states.append(state[:, 0, :])
        probs.append(float(np.asarray(prob).reshape(-1)[0]))
        state = np.asarray(new_state, dtype=np.float32)
        context = audio[start + CHUNK - CONTEXT : start + CHUNK]
    return np.stack(rows), np.stack(states, axis=1), np.asarray(probs)


def build_silero_example(
    out_dir: Path,
    variant: Variant = "static",
    *,
    calibration_chunks: int = 200,
    eval_chunks: int = 300,
    seed: int = 0,
) -> SileroExample:
    """Copy the wheel's ``variant`` model into ``out_dir`` and write synthetic calibration/eval ``.npz`` files.

    Calibration and evaluation use different seeds (different clips). Raises
    :class:`~packager.errors.ModelInputError` when silero-vad is not installed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"silero-{variant}.onnx"
    shutil.copyfile(silero_model_path(variant), model_path)
    with_sr = variant == "control_flow"
    paths = []
    share = 0.0
    for role, chunks, clip_seed in (("calibration", calibration_chunks, seed), ("eval", eval_chunks, seed + 1000)):
        audio = synthetic_audio((chunks * CHUNK + CHUNK) / SAMPLE_RATE, clip_seed)
        inputs, states, probs = stream_chunks(model_path, audio, with_sr)
        arrays = {"input": inputs[:chunks], "state": np.ascontiguousarray(states[:, :chunks])}
        if with_sr:
            arrays["sr"] = np.array(SAMPLE_RATE, dtype=np.int64)
        path = out_dir / f"{role}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        paths.append(path)
        share = float((probs[:chunks] >= 0.5).mean())
    return SileroExample(model_path, paths[0], paths[1], variant, share)
