"""The measuring half of ``tandem profile``: time a dense GQA transformer on a CUDA GPU.

This module needs PyTorch and a CUDA GPU and nothing else from tandem (stdlib + torch only), so it
can also be copied to a GPU host and run on its own (``python3 gpu.py SPEC.json OUT.json``). It is
imported only inside ``tandem profile``'s measuring path; the test suite never imports it.

Why random weights: kernel time depends on shapes and dtypes, not on the values, so no checkpoint
is downloaded. Values are drawn at random (never zeros: zeros can run measurably faster).

What is timed, and how it relates to a serving engine:
- prefill: one prompt of N new tokens after C cached tokens, in one forward pass (QKV, RoPE, KV cache
  write, causal flash attention over C+N keys, MLP), logits for the last token only;
- decode: one step of B sequences of equal context T with a static contiguous KV cache (B x T tokens),
  attention as a grouped-query flash-attention call, logits for every sequence;
- small steps are replayed as CUDA graphs (as vLLM/SGLang do for decode), so launch gaps do not
  inflate the figure; large prefills run eagerly, where launches are a negligible share.
When the KV cache or the weights of all layers do not fit, only ``k`` of the ``L`` identical layers
are run and the per-layer time is scaled: ``t = t_head + (L / k) * (t_k - t_head)``, ``t_head`` the
embedding + final norm + LM head measured separately. Each point records ``layers_measured``.

The result is a plain JSON-able dict (see :func:`measure`); fitting and the profile file format
live in the CPU-only modules beside this one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

RAW_FORMAT_VERSION = 1
GIB = 1024**3
# Steps at most this many tokens are captured as CUDA graphs; bigger ones are timed eagerly.
GRAPH_MAX_TOKENS = 2048
# Flash attention only for prefill: a silent fall-back to the math kernel would time the wrong thing.
FAST_ATTENTION = [SDPBackend.FLASH_ATTENTION]
# Decode kernels tried (fastest kept). cuDNN is left out: its CUDA-graph capture is the least proven.
DECODE_CANDIDATES = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def environment() -> dict[str, str]:
    props = torch.cuda.get_device_properties(0)
    smi = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
               "--format=csv,noheader"])
    return {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_multiprocessors": str(props.multi_processor_count),
        "gpu_memory_bytes": str(props.total_memory),
        "nvidia_smi": smi,
        "driver": smi.split(", ")[1] if smi.count(", ") >= 2 else smi,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


class Timer:
    """Median device time of a callable, CUDA-graph replayed when ``graph`` is set."""

    def __init__(self, target_s: float, min_reps: int, max_reps: int) -> None:
        self.target_s, self.min_reps, self.max_reps = target_s, min_reps, max_reps

    def __call__(self, fn: Callable[[], object], graph: bool) -> dict[str, float]:
        # One eager call first: cuBLAS handles, workspace and lazy initialisation stay out of the numbers.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        run: Callable[[], object] = fn
        g = None
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        estimate = time.perf_counter() - t0
        reps = max(self.min_reps, min(self.max_reps, int(self.target_s / max(estimate, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True))
        del g
        return {"median_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "reps": reps}


def microbench(timer: Timer) -> dict[str, float]:
    """Achieved bf16 matmul FLOP/s and device-to-device copy bandwidth (bytes read + written)."""
    n = 8192
    mats = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    turn = [0]

    def mm() -> None:
        a, b = mats[turn[0] % 3]
        turn[0] += 1
        torch.matmul(a, b, out=out)

    mm_t = timer(mm, graph=False)
    nbytes = 2 * GIB
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp_t = timer(lambda: dst.copy_(src), graph=False)
    return {
        "matmul_n": n,
        "matmul_tflops": 2 * n**3 / mm_t["median_s"] / 1e12,
        "copy_bytes": nbytes,
        "copy_gbps": 2 * nbytes / cp_t["median_s"] / 1e9,
    }


class Model:
    """``k`` transformer layers of the given shape plus embedding, final norm and LM head, in bf16."""

    def __init__(self, shape: dict[str, Any], layers: int, positions: int) -> None:
        d, h, hkv, hd, inter = (shape["hidden_size"], shape["num_attention_heads"], shape["num_kv_heads"],
                                shape["head_dim"], shape["intermediate_size"])
        self.h, self.hkv, self.hd = h, hkv, hd
        self.group = h // hkv
        self.eps = 1e-6
        self.expand_kv = False  # set by select_attention
        self.decode_backends = FAST_ATTENTION

        def rand(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, device="cuda", dtype=torch.bfloat16) * 0.02

        before = torch.cuda.memory_allocated()
        self.layers = [
            {
                "ln1": torch.ones(d, device="cuda", dtype=torch.bfloat16),
                "wqkv": rand((h + 2 * hkv) * hd, d),
                "wo": rand(d, h * hd),
                "ln2": torch.ones(d, device="cuda", dtype=torch.bfloat16),
                "wgu": rand(2 * inter, d),
                "wdown": rand(d, inter),
            }
            for _ in range(layers)
        ]
        self.layer_bytes = (torch.cuda.memory_allocated() - before) // max(layers, 1)
        before = torch.cuda.memory_allocated()
        self.embed = rand(shape["vocab_size"], d)
        self.lm_head = self.embed if shape.get("tie_word_embeddings") else rand(shape["vocab_size"], d)
        self.norm = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        self.head_bytes = torch.cuda.memory_allocated() - before
        theta = float(shape.get("rope_theta", 500000.0))
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, device="cuda", dtype=torch.float32) / hd)
        pos = torch.arange(positions, device="cuda", dtype=torch.float32)
        ang = torch.outer(pos, inv)
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary embedding, rotate-half form; x is (tokens, heads, head_dim)."""
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _qkv(self, lay: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor):
        t = x.shape[0]
        hx = F.rms_norm(x, (x.shape[-1],), lay["ln1"], self.eps)
        q, k, v = F.linear(hx, lay["wqkv"]).split(
            [self.h * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
        q = self.rope(q.view(t, self.h, self.hd), pos)
        k = self.rope(k.view(t, self.hkv, self.hd), pos)
        return q, k, v.view(t, self.hkv, self.hd)

    def _mlp(self, lay: dict[str, torch.Tensor], x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + F.linear(attn, lay["wo"])
        gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), lay["ln2"], self.eps), lay["wgu"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, lay["wdown"])

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cached: int) -> torch.Tensor:
        """Causal attention of q (1, H, n, D) over k/v (1, Hkv, cached + n, D), bottom-right aligned."""
        n = q.shape[2]
        if self.expand_kv:
            k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        gqa = not self.expand_kv
        with sdpa_kernel(FAST_ATTENTION):
            if cached == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n, cached + n),
                                                  enable_gqa=gqa)

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, D) against k/v (B, Hkv, T, D).

        All queries of one KV group attend to the same keys at one position, so each group is laid
        out as a short query sequence (B, Hkv, group, D): plain attention with no GQA expansion,
        the layout serving engines' decode kernels use for the same reason.
        """
        b = q.shape[0]
        with sdpa_kernel(self.decode_backends):
            return F.scaled_dot_product_attention(q.view(b, self.hkv, self.group, self.hd), k, v)

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, cached: int, kv: torch.Tensor,
                layers: int) -> torch.Tensor:
        """One prompt; ``kv`` is (layers, 2, 1, kv_heads, cached + new, head_dim)."""
        n = ids.shape[0]
        x = self.embed[ids]
        for i in range(layers):
            lay = self.layers[i]
            q, k, v = self._qkv(lay, x, pos)
            kv[i, 0, 0, :, cached:cached + n] = k.transpose(0, 1)
            kv[i, 1, 0, :, cached:cached + n] = v.transpose(0, 1)
            o = self.prefill_attention(q.transpose(0, 1).unsqueeze(0), kv[i, 0], kv[i, 1], cached)
            x = self._mlp(lay, x, o[0].transpose(0, 1).reshape(n, self.h * self.hd))
        last = F.rms_norm(x[-1:], (x.shape[-1],), self.norm, self.eps)
        return F.linear(last, self.lm_head)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, layers: int) -> torch.Tensor:
        """One step of B sequences; ``kv`` is (layers, 2, B, kv_heads, context, head_dim)."""
        b = ids.shape[0]
        last = kv.shape[4] - 1
        x = self.embed[ids]
        for i in range(layers):
            lay = self.layers[i]
            q, k, v = self._qkv(lay, x, pos)
            kv[i, 0, :, :, last] = k
            kv[i, 1, :, :, last] = v
            o = self.decode_attention(q, kv[i, 0], kv[i, 1])
            x = self._mlp(lay, x, o.reshape(b, self.h * self.hd))
        return F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.lm_head)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def select_attention(model: Model, timer: Timer) -> dict[str, Any]:
    """Check both attention paths against an fp32 reference and pick the fastest correct decode kernel.

    Prefill uses flash attention with native GQA, or, where this torch lacks it, K/V expanded to
    every query head (recorded, as it costs extra memory traffic). Decode tries each fast backend on
    a short and a long context and keeps the fastest, as a serving engine picks its decode kernel.
    """
    h, hkv, hd, g = model.h, model.hkv, model.hd, model.group
    report: dict[str, Any] = {}
    cached, n = 96, 64
    q = torch.randn(1, h, n, hd, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, cached + n, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, cached + n, hd, device="cuda", dtype=torch.bfloat16)
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    scores = q.float() @ kf.transpose(-1, -2) / math.sqrt(hd)
    allowed = torch.ones(n, cached + n, device="cuda", dtype=torch.bool).tril(cached)
    ref = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vf
    for expand in (False, True):
        model.expand_kv = expand
        try:
            err = _rel_err(model.prefill_attention(q, k, v, cached), ref)
        except Exception as exc:
            report[f"prefill_expand_{expand}_error"] = repr(exc)
            continue
        report[f"prefill_expand_{expand}_rel_err"] = err
        if err < 2e-2:
            break
    else:
        raise RuntimeError(f"no correct prefill attention path: {report}")
    report["prefill_expand_kv"] = model.expand_kv

    b, t = 3, 200
    qd = torch.randn(b, h, hd, device="cuda", dtype=torch.bfloat16)
    kd = torch.randn(b, hkv, t, hd, device="cuda", dtype=torch.bfloat16)
    vd = torch.randn(b, hkv, t, hd, device="cuda", dtype=torch.bfloat16)
    refd = ((qd.float().unsqueeze(2) @ kd.float().repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(hd))
            .softmax(-1) @ vd.float().repeat_interleave(g, 1)).squeeze(2)
    best: tuple[float, SDPBackend] | None = None
    for backend in DECODE_CANDIDATES:
        name = backend.name.lower()
        model.decode_backends = [backend]
        try:
            err = _rel_err(model.decode_attention(qd, kd, vd).reshape(b, h, hd), refd)
            report[f"decode_{name}_rel_err"] = err
            if not err < 2e-2:
                continue
            total = 0.0
            for bb, tt in ((1, 32768), (64, 2048)):
                qq = torch.randn(bb, h, hd, device="cuda", dtype=torch.bfloat16)
                kk = torch.randn(bb, hkv, tt, hd, device="cuda", dtype=torch.bfloat16)
                vv = torch.randn(bb, hkv, tt, hd, device="cuda", dtype=torch.bfloat16)
                # Eager: a kernel of tens of microseconds against ~10 us of launch, equal for all.
                sec = timer(lambda qq=qq, kk=kk, vv=vv: model.decode_attention(qq, kk, vv), False)["median_s"]
                report[f"decode_{name}_b{bb}_t{tt}_us"] = sec * 1e6
                total += sec
        except Exception as exc:
            report[f"decode_{name}_error"] = repr(exc)[:300]
            continue
        if best is None or total < best[0]:
            best = (total, backend)
    if best is None:
        raise RuntimeError(f"no correct decode attention kernel: {report}")
    model.decode_backends = [best[1]]
    report["decode_backend"] = best[1].name
    return report


def _prefill_cases(spec: dict[str, Any]) -> list[tuple[int, int]]:
    cached = [(n, c) for n, c in spec.get("prefill_cached", [])]
    return [(n, 0) for n in spec.get("prefill_tokens", [])] + cached


def auto_layers(shape: dict[str, Any]) -> int:
    """As many real-shape layers as fit in 60% of free memory, leaving the rest for KV and activations."""
    d, hd, inter = shape["hidden_size"], shape["head_dim"], shape["intermediate_size"]
    layer = 2 * (d * (shape["num_attention_heads"] + 2 * shape["num_kv_heads"]) * hd
                 + d * shape["num_attention_heads"] * hd + 3 * d * inter)
    head = 2 * shape["vocab_size"] * d * (1 if shape.get("tie_word_embeddings") else 2)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(shape["num_layers"], int((0.6 * free - head) // layer)))


def auto_reserve(shape: dict[str, Any], spec: dict[str, Any]) -> float:
    """Bytes kept out of the KV pool: the MLP activations of the largest prompt, with margin.

    Per layer the MLP holds the residual, its norm, gate+up, SiLU(gate) and the product at once:
    about tokens x (2 x hidden + 4 x intermediate) bf16 values; 25% margin and 4 GiB for
    attention buffers, CUDA graph pools and cuBLAS workspaces.
    """
    tokens = max([n for n, _ in _prefill_cases(spec)] + [int(spec.get("activation_tokens", 8192))])
    per_token = 2 * (2 * shape["hidden_size"] + 4 * shape["intermediate_size"])
    return 4 * GIB + 1.25 * tokens * per_token


def measure(spec: dict[str, Any], out_path: str | None = None) -> dict[str, Any]:
    """Run the sweep in ``spec``; return (and, after every point, write to ``out_path``) the raw result.

    ``spec`` keys: ``shape`` (ModelShape fields), ``max_layers`` (default :func:`auto_layers`),
    ``prefill_tokens``, ``prefill_cached`` ([new, cached] pairs), ``decode_batches``, ``decode_contexts``,
    ``decode_max_tokens``, ``memory_fraction``, ``activation_tokens``, ``deadline_s``, ``target_s``,
    ``kv_reserve_gib`` (default :func:`auto_reserve`).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tandem profile needs a CUDA GPU (torch.cuda.is_available() is False)")
    started = time.monotonic()
    deadline = started + float(spec.get("deadline_s", 240))
    torch.manual_seed(0)
    shape = spec["shape"]
    big_l = shape["num_layers"]
    timer = Timer(float(spec.get("target_s", 0.3)), 3, 40)
    result: dict[str, Any] = {"format": RAW_FORMAT_VERSION, "shape": shape, "spec": spec,
                              "environment": environment(), "points": [], "skipped": [], "errors": []}

    def save() -> None:
        result["elapsed_s"] = time.monotonic() - started
        if out_path:
            tmp = out_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, out_path)

    _log(f"{result['environment']['gpu_name']} torch {torch.__version__}; shape {shape['name']}")
    result["micro"] = microbench(timer)
    micro = result["micro"]
    _log(f"matmul {micro['matmul_tflops']:.0f} TFLOP/s, copy {micro['copy_gbps']:.0f} GB/s")
    torch.cuda.empty_cache()
    save()

    built = min(big_l, int(spec.get("max_layers") or auto_layers(shape)))
    act_n = int(spec.get("activation_tokens", 8192))
    positions = max([n + c for n, c in _prefill_cases(spec)] + list(spec.get("decode_contexts", [])) + [act_n])
    model = Model(shape, built, positions)
    result["attention"] = select_attention(model, timer)
    _log(f"attention: {result['attention']}")
    hkv, hd = shape["num_kv_heads"], shape["head_dim"]
    kv_layer_token_bytes = 2 * hkv * hd * 2
    free, total = torch.cuda.mem_get_info()
    reserve = spec.get("kv_reserve_gib")
    reserve_bytes = float(reserve) * GIB if reserve is not None else auto_reserve(shape, spec)
    pool_bytes = int(free - reserve_bytes)
    pool = torch.empty(pool_bytes // 2, device="cuda", dtype=torch.bfloat16)
    pool.normal_()  # random, not zeros, and every page touched once
    result["memory"] = {
        "total_bytes": total,
        "layers_built": built,
        "layer_weight_bytes": model.layer_bytes,
        "head_weight_bytes": model.head_bytes,
        "model_weight_bytes": model.layer_bytes * big_l + model.head_bytes,
        "kv_pool_bytes": pool_bytes,
        "kv_reserve_bytes": int(reserve_bytes),
        "kv_bytes_per_token": kv_layer_token_bytes * big_l,
    }
    _log(f"built {built}/{big_l} layers ({model.layer_bytes / GIB:.2f} GiB each), "
         f"KV pool {pool_bytes / GIB:.1f} GiB")
    save()

    # Activation memory of one max-size step, for the token-capacity estimate.
    kv = pool[: built * 2 * hkv * act_n * hd].view(built, 2, 1, hkv, act_n, hd)
    ids = torch.randint(0, shape["vocab_size"], (act_n,), device="cuda")
    pos = torch.arange(act_n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model.prefill(ids, pos, 0, kv, built)
    torch.cuda.synchronize()
    act = torch.cuda.max_memory_allocated() - base
    frac = float(spec.get("memory_fraction", 0.9))
    mem = result["memory"]
    cap = (total * frac - mem["model_weight_bytes"] - act) // mem["kv_bytes_per_token"]
    result["memory"].update({"activation_tokens": act_n, "activation_peak_bytes": act,
                             "memory_fraction": frac, "kv_capacity_tokens": max(0, int(cap))})
    save()

    def head_time(tokens: int, graph: bool, decode: bool) -> float:
        hids = torch.randint(0, shape["vocab_size"], (tokens,), device="cuda")

        def head() -> torch.Tensor:
            x = model.embed[hids]
            x = x if decode else x[-1:]
            return F.linear(F.rms_norm(x, (x.shape[-1],), model.norm, model.eps), model.lm_head)

        return timer(head, graph)["median_s"]

    def record(point: dict[str, Any], k: int, timing: dict[str, float], graph: bool, tokens: int,
               decode: bool) -> None:
        t = timing["median_s"]
        point.update(layers_measured=k, measured_s=t, min_s=timing["min_s"], max_s=timing["max_s"],
                     reps=timing["reps"], cuda_graph=graph)
        if k < big_l:
            th = head_time(tokens, graph, decode)
            point["head_s"] = th
            t = th + (t - th) * big_l / k
        point["seconds"] = t
        result["points"].append(point)

    for n, c in _prefill_cases(spec):
        point: dict[str, Any] = {"kind": "prefill", "new_tokens": n, "cached_tokens": c}
        if time.monotonic() > deadline:
            result["skipped"].append({**point, "why": "deadline"})
            continue
        try:
            k = min(built, pool.numel() // (2 * hkv * (n + c) * hd))
            if k < 1:
                result["skipped"].append({**point, "why": "KV does not fit"})
                continue
            kv = pool[: k * 2 * hkv * (n + c) * hd].view(k, 2, 1, hkv, n + c, hd)
            ids = torch.randint(0, shape["vocab_size"], (n,), device="cuda")
            pos = torch.arange(c, c + n, device="cuda")
            graph = n <= GRAPH_MAX_TOKENS
            timing = timer(lambda ids=ids, pos=pos, c=c, kv=kv, k=k: model.prefill(ids, pos, c, kv, k), graph)
            record(point, k, timing, graph, n, decode=False)
            _log(f"prefill new={n} cached={c}: {point['seconds'] * 1e3:.2f} ms (k={k})")
        except Exception as exc:  # one bad point must not lose the rest of the sweep
            result["errors"].append({**point, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
            _log(f"prefill new={n} cached={c} failed: {exc!r}")
        torch.cuda.empty_cache()
        save()

    for ctx in spec.get("decode_contexts", []):
        for b in spec.get("decode_batches", []):
            point = {"kind": "decode", "batch": b, "context_tokens": b * ctx, "mean_context": ctx}
            if b * ctx > int(spec.get("decode_max_tokens", 1 << 20)):
                continue  # more KV than any engine of this shape holds; not worth device time
            if time.monotonic() > deadline:
                result["skipped"].append({**point, "why": "deadline"})
                continue
            try:
                k = min(built, pool.numel() // (2 * b * hkv * ctx * hd))
                if k < 1:
                    result["skipped"].append({**point, "why": "KV does not fit"})
                    continue
                kv = pool[: k * 2 * b * hkv * ctx * hd].view(k, 2, b, hkv, ctx, hd)
                ids = torch.randint(0, shape["vocab_size"], (b,), device="cuda")
                pos = torch.full((b,), ctx - 1, device="cuda", dtype=torch.long)
                timing = timer(lambda ids=ids, pos=pos, kv=kv, k=k: model.decode(ids, pos, kv, k), True)
                record(point, k, timing, True, b, decode=True)
                _log(f"decode batch={b} ctx={ctx}: {point['seconds'] * 1e3:.2f} ms (k={k})")
            except Exception as exc:
                result["errors"].append({**point, "error": repr(exc),
                                         "trace": traceback.format_exc()[-2000:]})
                _log(f"decode batch={b} ctx={ctx} failed: {exc!r}")
            torch.cuda.empty_cache()
            save()
    save()
    _log(f"done: {len(result['points'])} points, {len(result['skipped'])} skipped, "
         f"{len(result['errors'])} errors in {result['elapsed_s']:.0f} s")
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 gpu.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    measure(spec, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
