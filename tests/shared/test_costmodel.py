"""Cost model: monotonicity, units, and KV arithmetic against hand calculations."""

import pytest

from tandem.perf.costmodel import CostModel, attention_pairs
from tandem.perf.profile import GIB, GPUSpec, ModelShape, load_profile, roofline_profile

LLAMA3_8B = ModelShape(name="Llama-3-8B", num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256)
H100 = GPUSpec(name="H100", memory_gib=80, bf16_tflops=989, hbm_gbps=3350)


def test_llama3_8b_kv_bytes_and_capacity_by_hand() -> None:
    # 2 (K and V) x 32 layers x 8 kv heads x 128 head_dim x 2 bytes = 131072 bytes = 128 KiB per token
    assert LLAMA3_8B.kv_bytes_per_token == 131072
    assert 8.0e9 < LLAMA3_8B.params < 8.1e9  # Llama-3-8B has 8.03B parameters
    profile = roofline_profile("t", LLAMA3_8B, H100, memory_fraction=0.9, activation_reserve_gib=2.0)
    free = 80 * GIB * 0.9 - LLAMA3_8B.params * 2 - 2 * GIB
    assert profile.kv_capacity_tokens == int(free // 131072)
    assert 420_000 < profile.kv_capacity_tokens < 460_000


def test_model_too_big_has_zero_capacity() -> None:
    small_gpu = GPUSpec(name="tiny", memory_gib=8, bf16_tflops=100, hbm_gbps=500)
    assert roofline_profile("t", LLAMA3_8B, small_gpu).kv_capacity_tokens == 0


def test_prefill_monotone_in_new_and_cached_tokens() -> None:
    cm = CostModel.from_profile(load_profile("llama3-8b-h100"))
    times = [cm.prefill_time(n) for n in (128, 1024, 8192, 32768)]
    assert times == sorted(times) and len(set(times)) == 4
    assert cm.prefill_time(1024, cached_tokens=8192) > cm.prefill_time(1024, cached_tokens=0)
    # A cached prefix is cheaper than recomputing it.
    assert cm.prefill_time(1024, cached_tokens=8192) < cm.prefill_time(9216)
    # Long prompts cost super-linearly (attention is quadratic).
    assert cm.prefill_time(32768) / cm.prefill_time(8192) > 4


def test_decode_monotone_and_memory_floor() -> None:
    cm = CostModel.from_profile(load_profile("llama3-8b-h100"))
    assert cm.decode_step_time(32, 32 * 2048) > cm.decode_step_time(1, 2048)
    assert cm.decode_step_time(8, 8 * 8192) > cm.decode_step_time(8, 8 * 2048)
    # Seconds, plausible for an 8B model on an H100: a step is milliseconds, not micro- or whole seconds.
    assert 0.002 < cm.decode_step_time(1, 2048) < 0.05
    # Batching amortises the weight read: 32 sequences cost far less than 32 single steps.
    assert cm.decode_step_time(32, 32 * 2048) < 4 * cm.decode_step_time(1, 2048)


def test_coalesced_decode_equals_sum_of_steps() -> None:
    cm = CostModel.from_profile(load_profile("llama3-8b-h100"))
    batch, ctx, steps = 7, 7 * 1000, 25
    total = sum(cm.decode_step_time(batch, ctx + batch * i) for i in range(steps))
    assert cm.decode_steps_time(batch, ctx, steps) == pytest.approx(total)
    assert cm.decode_steps_within(batch, ctx, total) == steps
    assert cm.decode_steps_within(batch, ctx, total - 1e-9) == steps - 1


def test_kv_transfer_units() -> None:
    cm = CostModel.from_profile(load_profile("llama3-8b-h100"))
    # 10,000 tokens x 128 KiB = 1.31 GB = 10.49 Gbit over 100 Gbit/s = 0.105 s, plus the RTT.
    assert cm.kv_transfer_time(10_000, 100.0, rtt_s=0.01) == pytest.approx(0.01 + 10_000 * 131072 * 8 / 100e9)
    with pytest.raises(ValueError):
        cm.kv_transfer_time(1, 0)


def test_slowdown_scales_every_step() -> None:
    p = load_profile("llama3-8b-h100")
    assert CostModel.from_profile(p, slowdown=10).prefill_time(1000) == pytest.approx(
        10 * CostModel.from_profile(p).prefill_time(1000))


def test_attention_pairs_causal() -> None:
    assert attention_pairs(4, 0) == 10  # 1+2+3+4
    assert attention_pairs(2, 10) == 2 * 10 + 3


def test_shipped_profiles_load_and_unknown_name_is_clear() -> None:
    assert load_profile("llama3-8b-h100").model.name == "Llama-3-8B"
    assert load_profile("qwen2.5-32b-h100").model.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        load_profile("nope")
