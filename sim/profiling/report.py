"""Human-readable views of a measured profile: the headline table and its fit error.

The numbers are the measured points themselves (not the fitted curve), so a table shows what the
GPU did; the fit and roofline columns then say how far each model is from those measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.perf.profile import Profile, ProfilePoint

PREFILL_TOKENS = (1024, 8192, 32768)
DECODE_BATCHES = (1, 32, 128)
DECODE_CONTEXTS = (2048, 8192)


def prefill_tokens_per_s(points: Sequence[ProfilePoint], tokens: int) -> float | None:
    for p in points:
        if p.kind == "prefill" and p.new_tokens == tokens and p.cached_tokens == 0:
            return tokens / p.seconds
    return None


def decode_step_ms(points: Sequence[ProfilePoint], batch: int, context: int) -> float | None:
    """Measured step time of ``batch`` sequences of ``context`` tokens each."""
    for p in points:
        if p.kind == "decode" and p.batch == batch and p.context_tokens == batch * context:
            return p.seconds * 1e3
    return None


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table_header() -> list[str]:
    cols = ["profile"]
    cols += [f"prefill tok/s @{t // 1024}k" for t in PREFILL_TOKENS]
    cols += [f"decode ms b{b} @{c // 1024}k" for c in DECODE_CONTEXTS for b in DECODE_BATCHES]
    cols += ["fit MAPE prefill / decode", "roofline MAPE prefill / decode"]
    return cols


def table_row(profile: Profile) -> list[str]:
    pts = profile.points
    row = [profile.name]
    row += [_fmt(prefill_tokens_per_s(pts, t), 0) for t in PREFILL_TOKENS]
    row += [_fmt(decode_step_ms(pts, b, c), 2) for c in DECODE_CONTEXTS for b in DECODE_BATCHES]
    fit = profile.fit
    if fit is None:
        row += ["n/a", "n/a"]
    else:
        row.append(f"{fit.prefill_mape:.1f}% / {fit.decode_mape:.1f}%")
        if fit.roofline_prefill_mape is None or fit.roofline_decode_mape is None:
            row.append("n/a")
        else:
            row.append(f"{fit.roofline_prefill_mape:.1f}% / {fit.roofline_decode_mape:.1f}%")
    return row


def markdown_table(profiles: Sequence[Profile]) -> str:
    header = table_header()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_row(p)) + " |" for p in profiles]
    return "\n".join(lines)


def summary(profile: Profile) -> str:
    """A few lines for the terminal after ``tandem profile``."""
    p = profile.params
    lines = [
        f"{profile.name}: {profile.model.name} on {profile.gpu.name} ({profile.source}, {len(profile.points)} points)",
        f"  GPU: {profile.gpu.bf16_tflops:.0f} TFLOP/s bf16 matmul, {profile.gpu.hbm_gbps:.0f} GB/s copy",
        f"  fit: overhead {p.step_overhead_s * 1e3:.2f} ms, weight read {p.weight_read_s * 1e3:.2f} ms, "
        f"per token {p.per_token_s * 1e6:.2f} us, attention pair {p.attn_pair_s * 1e9:.3f} ns, "
        f"KV read {p.kv_read_s_per_token * 1e9:.1f} ns/token",
        f"  KV: {profile.model.kv_bytes_per_token} bytes/token, capacity {profile.kv_capacity_tokens:,} tokens "
        f"at memory fraction {profile.memory_fraction}",
    ]
    header, row = table_header(), table_row(profile)
    lines += [f"  {h}: {v}" for h, v in zip(header[1:], row[1:], strict=True)]
    return "\n".join(lines)
