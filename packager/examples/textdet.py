"""A real text detector (PP-OCRv4 DBNet from the ``rapidocr-onnxruntime`` wheel) as a packaging example.

The wheel ships ``models/ch_PP-OCRv4_det_infer.onnx`` (4.7 MB): input ``x`` ``[N, 3, H, W]``
(dynamic; RGB scaled to [-1, 1]), output ``sigmoid_0.tmp_0`` ``[N, 1, H, W]``, the per-pixel
text probability map a DB post-processor turns into boxes (model-specific decoding, so the
packager judges the score map: mask IoU at the profile's ``score_threshold``). The file is read
from the installed package without importing it (its own imports need OpenCV); nothing is
downloaded at run time.

Images are rendered here, deterministically (:func:`render_page`): a paper-like background with
a gradient and noise, lines and blocks of text in DejaVu fonts at several sizes, colours and
slight rotations, a few boxes and strokes that are not text, and, for some pages, a blur. The
model is pinned to ``size x size`` (default 320) by the packager's static-shape profiles or
runs dynamic elsewhere. Files written by :func:`build_textdet_example`: ``textdet.onnx`` (a copy
of the wheel's file), ``calibration.npz`` and ``eval.npz`` with ``x`` ``[N, 3, size, size]``.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packager.errors import ModelInputError

MODEL_FILE = "models/ch_PP-OCRv4_det_infer.onnx"
INPUT_NAME = "x"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf")
WORDS = [
    "invoice",
    "total",
    "amount",
    "date",
    "order",
    "number",
    "customer",
    "address",
    "street",
    "city",
    "shipping",
    "delivery",
    "tax",
    "price",
    "quantity",
    "edge",
    "model",
    "update",
    "device",
    "fleet",
    "rollout",
    "signed",
    "bundle",
    "version",
    "release",
    "notes",
    "page",
    "section",
    "chapter",
    "table",
    "Receipt",
    "TOTAL",
    "42.50",
    "EUR",
    "2026-12-07",
    "No.",
    "10937",
    "Tel",
    "+49",
    "30",
    "1234567",
    "www.example.org",
    "ID",
    "A7-93K",
]


@dataclass(frozen=True)
class TextDetExample:
    model_path: Path
    calibration_path: Path
    eval_path: Path
    size: int
    text_share: float  # share of evaluation pixels the fp32 model scores >= 0.3


def textdet_model_path() -> Path:
    """The installed ``rapidocr-onnxruntime`` wheel's detector file.

    Raises:
        ModelInputError: the package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    raise ModelInputError(
        f"the rapidocr-onnxruntime wheel is not installed (pip install --no-deps rapidocr-onnxruntime): no {MODEL_FILE}"
    )


def _font(name: str, size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    path = FONT_DIR / name
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size)


def render_page(seed: int, size: int = 320) -> np.ndarray:
    """One synthetic document/scene image, ``[size, size, 3]`` uint8 RGB, fully determined by ``seed``."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = rng.uniform(170, 250, size=3)
    ramp = np.linspace(-20, 20, size)[None, :, None] * rng.uniform(-1, 1)
    bg = np.clip(base[None, None, :] + ramp + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # non-text clutter: boxes and strokes
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(10, size // 2), y0 + rng.integers(5, size // 3)
        colour = tuple(int(c) for c in rng.integers(60, 230, 3))
        if rng.random() < 0.5:
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], outline=colour, width=int(rng.integers(1, 4)))
        else:
            draw.line([int(x0), int(y0), int(x1), int(y1)], fill=colour, width=int(rng.integers(1, 5)))
    y = int(rng.integers(4, 30))
    while y < size - 12:
        font_size = int(rng.integers(11, 30))
        font = _font(FONTS[int(rng.integers(len(FONTS)))], font_size)
        words = rng.choice(WORDS, size=int(rng.integers(1, 7)))
        ink = int(rng.integers(0, 90))
        colour = (ink, ink + int(rng.integers(0, 30)), ink + int(rng.integers(0, 40)))
        layer = Image.new("L", (size, font_size + 10), 0)
        ImageDraw.Draw(layer).text((int(rng.integers(2, 60)), 2), " ".join(words), font=font, fill=255)
        angle = float(rng.normal(0, 2.5))
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
        img.paste(Image.new("RGB", layer.size, colour), (0, y), layer)
        y += font_size + int(rng.integers(6, 28))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    return np.asarray(img, dtype=np.uint8)


def to_input(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 RGB -> the detector's input ``[N, 3, H, W]`` float32 in [-1, 1]."""
    x = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def pages(first_seed: int, count: int, size: int = 320) -> np.ndarray:
    """``count`` rendered pages (seeds ``first_seed...``) as detector input."""
    return to_input(np.stack([render_page(first_seed + i, size) for i in range(count)]))


def build_textdet_example(
    out_dir: Path, calibration_pages: int = 16, eval_pages: int = 16, size: int = 320
) -> TextDetExample:
    """Copy the wheel's detector into ``out_dir`` and write calibration/evaluation pages (disjoint seeds).

    Raises:
        ModelInputError: the wheel is not installed (see :func:`textdet_model_path`).
    """
    import onnxruntime as ort

    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "textdet.onnx"
    shutil.copyfile(textdet_model_path(), model)
    calib, evald = out_dir / "calibration.npz", out_dir / "eval.npz"
    np.savez(calib, x=pages(1_000, calibration_pages, size))
    eval_x = pages(50_000, eval_pages, size)
    np.savez(evald, x=eval_x)  # INPUT_NAME
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    probs = np.concatenate([session.run(None, {INPUT_NAME: eval_x[i : i + 1]})[0] for i in range(len(eval_x))])
    return TextDetExample(model, calib, evald, size, float((probs >= 0.3).mean()))
