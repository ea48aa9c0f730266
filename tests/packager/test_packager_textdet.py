"""A real text detector (PP-OCRv4 DBNet, shipped in the rapidocr-onnxruntime wheel) on rendered pages.

Its output is a per-pixel text probability map ``[N, 1, H, W]``: the packager infers a score map and
judges it by mask IoU at the profile's score threshold, not by cosine/SQNR over raw values.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from typer.testing import CliRunner

from edgeota.cli import _register_components, app
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import SigningKey, TrustedKeys, write_keypair
from packager.api import package_model
from packager.errors import PackagerError
from packager.examples.textdet import TextDetExample, build_textdet_example, render_page
from packager.model_config import parse_model_config
from packager.request import PackageRequest

pytest.importorskip("PIL", reason="Pillow renders the pages (pip install pillow)")
if importlib.util.find_spec("rapidocr_onnxruntime") is None:
    pytest.skip("the rapidocr-onnxruntime wheel is not installed (pip install --no-deps)", allow_module_level=True)

_register_components()
OUTPUT = "sigmoid_0.tmp_0"
runner = CliRunner()


@pytest.fixture(scope="module")
def textdet(tmp_path_factory: pytest.TempPathFactory) -> TextDetExample:
    return build_textdet_example(tmp_path_factory.mktemp("textdet"), calibration_pages=8, eval_pages=8)


@pytest.fixture
def det_profiles(make_profile: Callable[..., Path]) -> Path:
    """x86-avx2 without the host speed-up floor (timing under shared-CI load is no test), small search."""
    return make_profile(
        "det", latency__min_speedup_vs_fp32=None, latency__budget_ms=10_000,
        mixed_precision={"budget_s": 120, "max_float_nodes": 4},
    )  # fmt: skip


def _request(example: TextDetExample, out: Path, profiles_dir: Path, **kw):  # type: ignore[no-untyped-def]
    return PackageRequest(
        model=example.model_path, profiles=["det"], profiles_dir=profiles_dir, calibration=example.calibration_path,
        eval_data=example.eval_path, key=SigningKey.generate(), out_dir=out, name="textdet", latency=FAST,
        measure_memory=False, recipes=["int8-qdq-mixed"], **kw,
    )  # fmt: skip


def test_rendered_pages_are_deterministic_text(textdet: TextDetExample) -> None:
    page = render_page(7)
    assert page.shape == (320, 320, 3) and page.dtype == np.uint8
    assert np.array_equal(page, render_page(7)) and not np.array_equal(page, render_page(8))
    assert 0.02 < textdet.text_share < 0.5  # the fp32 detector finds text, and not everywhere


def test_detector_ships_int8_judged_by_mask_iou(textdet: TextDetExample, tmp_path: Path, det_profiles: Path) -> None:
    report = package_model(_request(textdet, tmp_path / "out", det_profiles))
    result = report.results["det"]
    assert result.ok, result.error
    assert result.output_kinds == {OUTPUT: "score_map"}
    gates = {g.name: g for g in result.gates}
    assert gates["fidelity_mask_iou"].ok and gates["fidelity_mask_iou"].threshold == 0.9
    assert "fidelity_cosine" not in gates and "fidelity_sqnr" not in gates  # the raw map is not what users see
    mp = result.mixed_precision
    assert mp is not None and mp["int8_weight_share"] > 0.5
    assert result.metrics["model_bytes"] < 0.5 * result.baseline["model_bytes"]
    assert mp["steps"][0]["k"] == 0 and "fidelity_mask_iou" in mp["steps"][0]["metric"]


def test_detector_refused_with_the_measured_reason(textdet: TextDetExample, tmp_path: Path, det_profiles: Path) -> None:
    # IoU 1.0 means every thresholded pixel must agree: no int8 node set of at most 4 float nodes does that.
    report = package_model(_request(textdet, tmp_path / "out", det_profiles, gate_overrides={"min_mask_iou": 1.0}))
    result = report.results["det"]
    assert not result.ok and result.bundle_path is None
    assert result.error is not None and "mixed precision found no passing candidate" in result.error
    assert "fidelity_mask_iou: mask IoU 0." in result.error
    assert not list((tmp_path / "out").glob("*.bundle.tar"))


def test_cli_output_kind_and_min_mask_iou(textdet: TextDetExample, tmp_path: Path, det_profiles: Path) -> None:
    priv, pub = write_keypair(tmp_path / "k.pem")
    base = [
        "package", str(textdet.model_path), "-p", "det", "--profiles-dir", str(det_profiles), "--calibration",
        str(textdet.calibration_path), "--eval", str(textdet.eval_path), "--key", str(priv), "--name", "textdet",
        "--recipe", "int8-qdq", "--no-progress",
    ]  # fmt: skip
    # Declared generic: cosine/SQNR gate the raw map again (and, for this int8 detector, refuse it).
    generic = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--output-kind", f"{OUTPUT}=generic"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())["results"]["det"]
    assert report["output_kinds"] == {OUTPUT: "generic"}
    names = {g["name"] for g in report["gates"]}
    assert {"fidelity_cosine", "fidelity_sqnr"} <= names and "fidelity_mask_iou" not in names
    assert generic.exit_code in (0, 1), generic.output
    shipped = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--min-mask-iou", "0.5"])
    assert shipped.exit_code == 0, shipped.output
    bundle = next((tmp_path / "b").glob("*.bundle.tar"))
    manifest = verify_bundle(bundle, TrustedKeys.from_files([pub])).manifest
    assert manifest.gate_overrides is not None and manifest.gate_overrides.min_mask_iou == 0.5
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "c"), "--output-kind", "nope=score_map"])
    assert bad.exit_code == 2 and "'nope', which is not an output" in bad.output
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "d"), "--output-kind", "score_map"])
    assert bad.exit_code == 2 and "expected NAME=KIND" in bad.output


def test_model_config_output_kinds() -> None:
    assert parse_model_config({"output_kinds": {OUTPUT: "score_map"}}).output_kinds == {OUTPUT: "score_map"}
    with pytest.raises(PackagerError, match=r"output_kinds\.out: unknown output kind 'masks'"):
        parse_model_config({"output_kinds": {"out": "masks"}})
    with pytest.raises(PackagerError, match="'output_kinds' must map"):
        parse_model_config({"output_kinds": ["score_map"]})
