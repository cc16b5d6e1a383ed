"""``tandem profile``'s CPU half: fitting, the raw and profile files, roofline comparison, shipped data.

The GPU half (``tandem.sim.profiling.gpu``) needs PyTorch and a CUDA GPU; it is exercised on the
device machine, and these tests check that nothing here imports it (or torch).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.cli import main
from tandem.perf.costmodel import CostModel
from tandem.perf.profile import (
    DEFAULT_PROFILE,
    ROOFLINE_EFFICIENCY,
    CostParams,
    GPUSpec,
    Profile,
    ProfilePoint,
    load_profile,
    roofline_params,
)
from tandem.sim.profiling.cli import ProfileCommand, write_profile
from tandem.sim.profiling.fit import (
    FitError,
    calibrate_roofline,
    fit_params,
    fit_report,
    mape,
    predict,
    split_mape,
)
from tandem.sim.profiling.measurements import MeasurementFileError, load_raw, to_profile
from tandem.sim.profiling.report import decode_step_ms, markdown_table, prefill_tokens_per_s
from tandem.sim.profiling.shapes import NAMED_SHAPES, ShapeError, gpu_key, resolve_shape, shape_key

PROFILES = Path(__file__).resolve().parents[2] / "tandem" / "perf" / "profiles"
MEASURED = ["llama3-8b-h100", "qwen2.5-32b-h100", "llama3-8b-h200", "qwen2.5-32b-h200"]
# Stated bounds (tandem/perf/profiles/README.md): fit error of every shipped measured profile, and the
# calibrated roofline's error on the same points (prefill, decode).
FIT_MAPE_BOUND = 8.0
ROOFLINE_MAPE_BOUND = (8.0, 15.0)

TRUE = CostParams(step_overhead_s=4e-4, weight_read_s=5e-3, per_token_s=2.5e-5, attn_pair_s=1.5e-9,
                  kv_read_s_per_token=4.5e-8)


def synthetic_points(params: CostParams, noise: float = 0.0, seed: int = 0) -> list[ProfilePoint]:
    """The sweep ``tandem profile`` runs, timed by a known cost model (times optionally jittered)."""
    rng = random.Random(seed)
    model = CostModel(params, kv_bytes_per_token=0)
    points = []
    for n, c in [(n, 0) for n in (64, 128, 256, 512, 1024, 4096, 16384, 32768)] + [
            (128, 8192), (1024, 4096), (4096, 28672), (16384, 16384)]:
        t = model.prefill_time(n, c) * (1 + rng.uniform(-noise, noise))
        points.append(ProfilePoint(kind="prefill", new_tokens=n, cached_tokens=c, seconds=t))
    for b in (1, 8, 32, 64, 128, 256, 512):
        for ctx in (512, 2048, 8192):
            t = model.decode_step_time(b, b * ctx) * (1 + rng.uniform(-noise, noise))
            points.append(ProfilePoint(kind="decode", batch=b, context_tokens=b * ctx, seconds=t))
    return points


def test_fit_recovers_known_coefficients_exactly() -> None:
    fitted = fit_params(synthetic_points(TRUE))
    for field, want in TRUE.model_dump().items():
        assert getattr(fitted, field) == pytest.approx(want, rel=1e-4), field
    assert mape(fitted, synthetic_points(TRUE)) < 1e-3


def test_fit_with_measurement_noise_stays_close() -> None:
    points = synthetic_points(TRUE, noise=0.03, seed=7)
    fitted = fit_params(points)
    # +-3% uniform noise: every point is predicted within a few percent, the slopes within 10%.
    assert mape(fitted, points) < 3.0
    for field in ("per_token_s", "attn_pair_s", "kv_read_s_per_token"):
        assert getattr(fitted, field) == pytest.approx(getattr(TRUE, field), rel=0.1), field
    assert fitted.step_overhead_s + fitted.weight_read_s == pytest.approx(
        TRUE.step_overhead_s + TRUE.weight_read_s, rel=0.05)


def test_fit_rejects_points_that_cannot_determine_the_model() -> None:
    decode_only = [p for p in synthetic_points(TRUE) if p.kind == "decode"]
    with pytest.raises(FitError, match="both prefill and decode"):
        fit_params(decode_only)
    with pytest.raises(FitError):
        fit_params(synthetic_points(TRUE)[:3])


def test_roofline_comparison_is_zero_on_its_own_curve_and_positive_elsewhere() -> None:
    shape = NAMED_SHAPES["llama3-8b"]
    gpu = GPUSpec(name="H100", memory_gib=79.2, bf16_tflops=800, hbm_gbps=3000)
    roof = roofline_params(shape, gpu)
    on_curve = synthetic_points(roof)
    report = fit_report(fit_params(on_curve), roof, on_curve)
    assert report.roofline_prefill_mape == pytest.approx(0, abs=1e-9)
    assert report.roofline_decode_mape == pytest.approx(0, abs=1e-9)
    # Against other timings the roofline is off, and the report says by how much, per kind.
    report = fit_report(TRUE, roof, synthetic_points(TRUE))
    assert (report.roofline_prefill_mape, report.roofline_decode_mape) == pytest.approx(
        split_mape(roof, synthetic_points(TRUE)))
    assert report.roofline_prefill_mape > 10 and report.prefill_mape == pytest.approx(0, abs=1e-9)


def test_roofline_efficiency_constants_come_from_the_8b_measurements() -> None:
    calibrated = calibrate_roofline([load_profile("llama3-8b-h100"), load_profile("llama3-8b-h200")])
    for field, value in ROOFLINE_EFFICIENCY.model_dump().items():
        assert getattr(calibrated, field) == pytest.approx(value, rel=0.03), field


def test_calibration_recovers_efficiencies_from_roofline_generated_points() -> None:
    gpu = GPUSpec(name="H100", memory_gib=79.2, bf16_tflops=800, hbm_gbps=3000)
    shape = NAMED_SHAPES["llama3-8b"]
    eff = ROOFLINE_EFFICIENCY.model_copy(update={"compute": 0.5, "attention": 0.3, "bandwidth": 0.7})
    points = synthetic_points(roofline_params(shape, gpu, eff))
    profile = Profile(name="t", source="measured", model=shape, gpu=gpu, params=fit_params(points), points=points)
    calibrated = calibrate_roofline([profile])
    for field, value in eff.model_dump().items():
        assert getattr(calibrated, field) == pytest.approx(value, rel=0.01), field


def test_mape_by_hand() -> None:
    point = ProfilePoint(kind="decode", batch=1, context_tokens=1000, seconds=0.01)
    predicted = predict(TRUE, point)
    assert predicted == pytest.approx(4e-4 + 5e-3 + 4.5e-8 * 1000)
    assert mape(TRUE, [point]) == pytest.approx(100 * abs(predicted - 0.01) / 0.01)


@pytest.mark.parametrize("name", MEASURED)
def test_shipped_measured_profiles_load_and_fit_within_bound(name: str) -> None:
    profile = load_profile(name)
    assert profile.source == "measured"
    assert profile.fit is not None
    assert profile.fit.prefill_mape < FIT_MAPE_BOUND and profile.fit.decode_mape < FIT_MAPE_BOUND
    assert profile.fit.roofline_prefill_mape is not None and profile.fit.roofline_decode_mape is not None
    assert profile.fit.roofline_prefill_mape < ROOFLINE_MAPE_BOUND[0]
    assert profile.fit.roofline_decode_mape < ROOFLINE_MAPE_BOUND[1]
    assert (profile.fit.roofline_prefill_mape, profile.fit.roofline_decode_mape) == pytest.approx(
        split_mape(roofline_params(profile.model, profile.gpu), profile.points))
    kinds = {p.kind for p in profile.points}
    assert kinds == {"prefill", "decode"} and len(profile.points) >= 30
    for key in ("gpu_name", "driver", "torch", "method"):
        assert profile.environment.get(key), key
    assert name.split("-")[-1] in profile.gpu.name.lower()
    # The recorded fit error is the error of the recorded coefficients on the recorded points.
    assert (profile.fit.prefill_mape, profile.fit.decode_mape) == pytest.approx(
        split_mape(profile.params, profile.points))


@pytest.mark.parametrize("name", MEASURED)
def test_shipped_profiles_are_reproducible_from_their_raw_measurements(name: str) -> None:
    refit = to_profile(load_raw(PROFILES / "raw" / f"{name}.json"))
    shipped = load_profile(name)
    assert refit.name == name
    assert refit.model_dump(exclude={"params", "fit"}) == shipped.model_dump(exclude={"params", "fit"})
    # Another numpy/scipy may round the last bits differently; the coefficients must still agree.
    for field, value in shipped.params.model_dump().items():
        assert getattr(refit.params, field) == pytest.approx(value, rel=1e-6), field
    assert refit.fit is not None and shipped.fit is not None
    assert refit.fit.prefill_mape == pytest.approx(shipped.fit.prefill_mape, rel=1e-6)
    assert refit.fit.decode_mape == pytest.approx(shipped.fit.decode_mape, rel=1e-6)


def test_default_profile_is_measured_8b_on_h100() -> None:
    profile = load_profile(DEFAULT_PROFILE)
    assert DEFAULT_PROFILE == "llama3-8b-h100"
    assert profile.source == "measured" and profile.model.name == "Llama-3-8B"
    assert "H100" in profile.gpu.name


def test_partial_depth_points_are_marked() -> None:
    # Qwen2.5-32B (65 GB of bf16 weights) was measured on the H100 with 8 of its 64 layers.
    qwen = load_profile("qwen2.5-32b-h100")
    assert {p.layers_measured for p in qwen.points} == {8}
    assert "8 of 64 layers" in qwen.environment["layer_scaling"]
    # The 8B fits whole; only decode points whose KV cache did not fit ran fewer layers.
    llama = load_profile("llama3-8b-h100")
    partial = [p for p in llama.points if p.layers_measured is not None]
    assert partial and all(p.kind == "decode" and p.context_tokens >= 256 * 2048 for p in partial)


def test_layer_scaling_agrees_with_full_depth_on_h200() -> None:
    # On the H200 Qwen2.5-32B fits whole: the same sweep with 8 layers, scaled, matches it.
    full = to_profile(load_raw(PROFILES / "raw" / "qwen2.5-32b-h200.json"))
    scaled = to_profile(load_raw(PROFILES / "raw" / "qwen2.5-32b-h200-8layers.json"))
    key = lambda p: (p.kind, p.new_tokens, p.cached_tokens, p.batch, p.context_tokens)  # noqa: E731
    by_key = {key(p): p.seconds for p in full.points}
    errors = [abs(p.seconds - by_key[key(p)]) / by_key[key(p)] for p in scaled.points]
    assert len(errors) == len(full.points)
    assert sum(errors) / len(errors) < 0.02 and max(errors) < 0.06


def test_profile_file_round_trip(tmp_path: Path) -> None:
    profile = load_profile("qwen2.5-32b-h100")
    path = tmp_path / "sub" / "p.json"
    write_profile(profile, path)
    assert Profile.model_validate_json(path.read_text()) == profile
    assert load_profile(str(path)) == profile


def test_measured_table_reads_the_points() -> None:
    profile = load_profile("llama3-8b-h100")
    p8k = next(p for p in profile.points if p.kind == "prefill" and p.new_tokens == 8192 and not p.cached_tokens)
    assert prefill_tokens_per_s(profile.points, 8192) == pytest.approx(8192 / p8k.seconds)
    d = next(p for p in profile.points if p.kind == "decode" and p.batch == 32 and p.context_tokens == 32 * 2048)
    assert decode_step_ms(profile.points, 32, 2048) == pytest.approx(d.seconds * 1e3)
    assert decode_step_ms(profile.points, 3, 2048) is None
    table = markdown_table([profile])
    assert table.count("\n") == 2 and "llama3-8b-h100" in table


def test_hf_config_shape_and_errors(tmp_path: Path) -> None:
    config = {"_name_or_path": "meta-llama/Meta-Llama-3-8B", "num_hidden_layers": 32, "hidden_size": 4096,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
              "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    key, shape = resolve_shape(str(path))
    assert key == "meta-llama-3-8b" and shape.head_dim == 128 and shape.max_model_len == 8192
    assert shape.kv_bytes_per_token == NAMED_SHAPES["llama3-8b"].kv_bytes_per_token
    assert shape_key(NAMED_SHAPES["qwen2.5-32b"].model_copy(update={"name": "anything"})) == "qwen2.5-32b"
    del config["hidden_size"]
    path.write_text(json.dumps(config))
    with pytest.raises(ShapeError, match="hidden_size"):
        resolve_shape(str(path))
    with pytest.raises(ShapeError, match="neither a named shape"):
        resolve_shape("no-such-model")
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100" and gpu_key("NVIDIA H200") == "h200"


def test_sweep_spec_from_settings(tmp_path: Path) -> None:
    spec = ProfileCommand(**{"model-config": "qwen2.5-32b", "max_layers": 8, "decode_batches": [1, 2]}).spec()
    assert spec["shape"] == NAMED_SHAPES["qwen2.5-32b"].model_dump() and spec["shape_key"] == "qwen2.5-32b"
    assert spec["max_layers"] == 8 and spec["decode_batches"] == [1, 2]
    assert json.loads(json.dumps(spec)) == spec  # plain JSON for the GPU half
    with pytest.raises(ValueError, match="decode_batches"):
        ProfileCommand(decode_batches=[0])


def test_cli_fit_only_writes_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    assert main(["profile", "--fit-only", str(PROFILES / "raw" / "llama3-8b-h100.json"), "--out", str(out),
                 "--name", "mine"]) == 0
    written = Profile.model_validate_json(out.read_text())
    assert written.name == "mine" and written.points == load_profile("llama3-8b-h100").points
    assert written.params.model_dump() == pytest.approx(load_profile("llama3-8b-h100").params.model_dump(), rel=1e-6)
    assert "fit MAPE" in capsys.readouterr().out


def test_cli_fit_only_rejects_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "points": []}))
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--fit-only", str(bad)])
    assert exc.value.code == 2
    assert "not a tandem raw-measurement file" in capsys.readouterr().err
    with pytest.raises(MeasurementFileError, match="cannot read"):
        load_raw(tmp_path / "missing.json")


def test_default_test_run_does_not_import_torch(tmp_path: Path) -> None:
    assert "torch" not in sys.modules, "a module imported by the test suite pulled in torch"
    assert "tandem.sim.profiling.gpu" not in sys.modules
    # Even where torch is installed, the CPU path never reaches for it: block it and run a refit.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tandem.cli import main\n"
        f"rc = main(['profile', '--fit-only', {str(PROFILES / 'raw' / 'llama3-8b-h100.json')!r},"
        f" '--out', {str(tmp_path / 'p.json')!r}])\n"
        "assert rc == 0 and 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
