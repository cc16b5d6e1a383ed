"""The request bodies of the engines' prefill/decode handshakes (vLLM NixlConnector, SGLang bootstrap).

Built here once, so the code that talks to real vLLM/SGLang engines and the code the tests run
against the simulator are one and the same. The decode choice is in ``tandem.router.routing.decode``.
"""

from __future__ import annotations

import copy
import random
from typing import Any

#: vLLM NixlConnector: what the proxy sends with the prefill request.
VLLM_PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None,
}
_VLLM_DECODE_KEYS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")
#: Fields that cannot go with a one-token prefill: dropped from the prefill leg (the decode leg keeps them).
_NOT_WITH_ONE_TOKEN = ("min_tokens",)
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


# ----- vLLM handshake -----------------------------------------------------------------------------
def vllm_prefill_body(data: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg: one token, not streamed, asking the engine to keep the KV for a remote decode."""
    body = copy.deepcopy(data)
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    for name in _NOT_WITH_ONE_TOKEN:  # min_tokens: 12 with max_tokens: 1 is a 400 the request does not deserve
        body.pop(name, None)
    body["stream"] = False
    body.pop("stream_options", None)
    body["kv_transfer_params"] = dict(VLLM_PREFILL_KV_PARAMS)
    return body


def prefill_blind_spots(data: dict[str, Any], context_len: int | None) -> tuple[str, str] | None:
    """(message, field) of what the decode engine would refuse but the one-token prefill leg cannot see,
    because it rewrites those fields: an output limit that is not a positive integer or exceeds the
    model's context length, a ``min_tokens`` that is not a count or exceeds the output limit. Checked
    before the prefill, so such a request is not computed once for nothing; anything else the decode
    engine refuses still reaches the client as the engine worded it."""
    limit: int | None = None
    for name in _OUTPUT_LIMITS:
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name}: must be a positive integer, got {value!r}", name
        if context_len is not None and value > context_len:
            return f"{name}: {value} exceeds the model's context length of {context_len} tokens", name
        limit = value if limit is None else min(limit, value)
    least = data.get("min_tokens")
    if least is not None:
        if not isinstance(least, int) or isinstance(least, bool) or least < 0:
            return f"min_tokens: must be a non-negative integer, got {least!r}", "min_tokens"
        if limit is not None and least > limit:
            return f"min_tokens: {least} exceeds the output limit of {limit} tokens", "min_tokens"
    return None


def vllm_decode_params(prefill_response: Any) -> dict[str, Any]:
    """The ``kv_transfer_params`` of a prefill engine's answer, checked before a decode gets them."""
    if not isinstance(prefill_response, dict) or not isinstance(prefill_response.get("kv_transfer_params"), dict):
        raise ValueError("the prefill engine's answer carries no kv_transfer_params (is it a KV producer?)")
    params = prefill_response["kv_transfer_params"]
    if params.get("do_remote_prefill") is not True:
        raise ValueError("kv_transfer_params.do_remote_prefill: the prefill engine did not offer its KV")
    missing = [k for k in _VLLM_DECODE_KEYS if params.get(k) is None]
    if missing:
        raise ValueError(f"kv_transfer_params.{missing[0]}: missing in the prefill engine's answer")
    return params


def vllm_decode_body(data: dict[str, Any], kv_params: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(data)
    body["kv_transfer_params"] = kv_params
    return body


# ----- SGLang handshake ---------------------------------------------------------------------------
def new_bootstrap_room(rng: random.Random) -> int:
    """A random 63-bit room id, as SGLang's router draws it."""
    return rng.getrandbits(63)


def sglang_bodies(data: dict[str, Any], host: str, port: int, room: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prefill body, decode body): the same request, both naming the prefill's bootstrap server."""
    fields = {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}
    prefill = {**copy.deepcopy(data), **fields, "stream": False}
    prefill.pop("stream_options", None)
    decode = {**copy.deepcopy(data), **fields}
    return prefill, decode
