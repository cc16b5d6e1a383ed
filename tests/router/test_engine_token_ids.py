"""The routing request carries the engine's own token ids (``RouteRequest.tokens``), so the exact
cache view can match a prompt against the token ids of the blocks the engine reports cached.

Checked against real vLLM 0.32's own answers recorded in ``tests/fixtures/vllm-0.32``, with the
tokenizer of the model it served (saved beside them: the tiny model's has changed since): its
``/tokenize`` of a completion prompt and of chat messages (rendered by the model's chat template),
and the token ids of the KV blocks it stored for a chat request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.prefix import block_id_tokens, word_ids
from tandem.router.admission import route_request
from tandem.router.requestview import Kind, RequestView, read_view
from tandem.router.routing.types import RouteRequest
from tandem.router.tokenizer import EngineTokenizer, load_tokenizer

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32"


@pytest.fixture(scope="module")
def tokenizer() -> EngineTokenizer:
    """The recorded engine's tokenizer (the README names its fingerprint)."""
    from tandem.bench import tinymodel

    assert f"fingerprint `{tinymodel.fingerprint(FIXTURES / 'tokenizer')}`" in (FIXTURES / "README.md").read_text()
    return load_tokenizer(FIXTURES / "tokenizer")


@pytest.fixture(scope="module")
def exchanges() -> dict:
    return json.loads((FIXTURES / "exchanges.json").read_text())


def routed(body: dict[str, Any], kind: Kind, tokenizer: EngineTokenizer | None = None, *,
           trust_hints: bool = False) -> RouteRequest:
    view = read_view({"model": "m", **body}, kind)
    assert isinstance(view, RequestView), view
    keyed = route_request(view, 4, tokenizer, trust_hints=trust_hints)
    assert isinstance(keyed, tuple), keyed
    return keyed[0]


def engine_ids(body: dict[str, Any], kind: Kind, tokenizer: EngineTokenizer | None = None) -> list[int] | None:
    tokens = routed(body, kind, tokenizer).tokens
    return None if tokens is None else list(tokens.ids)


def test_completion_and_chat_ids_are_vllms(tokenizer, exchanges) -> None:
    plain = exchanges["tokenize"]
    assert engine_ids(plain["request"], "completion", tokenizer) == plain["body"]["tokens"]
    chat = exchanges["tokenize_chat"]
    ids = engine_ids(chat["request"], "chat", tokenizer)
    assert ids == chat["body"]["tokens"] and len(ids) == chat["body"]["count"]


def test_chat_ids_match_the_blocks_vllm_stored(tokenizer, exchanges) -> None:
    """The ``chat`` exchange made vLLM store one 128-token block: its tokens are our first 128."""
    decoded = json.loads((FIXTURES / "kv-events-decoded.json").read_text())
    stored = next(e for m in decoded if m["step"] == "chat" for e in m["payload"][1] if e["type"] == "BlockStored")
    ids = engine_ids(exchanges["chat"]["request"], "chat", tokenizer)
    assert ids is not None and ids[:128] == stored["token_ids"]


def test_no_exact_ids_where_the_chat_template_is_missing_or_refuses(tmp_path, tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "hello there"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
    assert engine_ids(parts, "chat", tokenizer) == engine_ids(chat, "chat", tokenizer) is not None  # as vLLM flattens
    bare = tmp_path / "tokenizer.json"
    bare.write_bytes((FIXTURES / "tokenizer" / "tokenizer.json").read_bytes())  # no tokenizer_config.json beside it
    rreq = routed(chat, "chat", load_tokenizer(bare))
    assert rreq.tokens is None and rreq.block_hashes  # still keyed for routing, on the shadow view
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    assert engine_ids(chat, "chat", load_tokenizer(bare)) is None  # the template refused: no exact ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match="chat template"):
        load_tokenizer(bare)


def test_route_request_carries_the_engine_token_ids() -> None:
    # Without a tokenizer: tandem sim's ids of the word pieces (its /tokenize, its KV-cache events).
    assert engine_ids({"prompt": "the model serves tokens"}, "completion") == word_ids("the model serves tokens")
    assert engine_ids({"messages": [{"role": "user", "content": "hi"}]}, "chat") == word_ids("<|user|>\nhi\n")
    # Token ids as given, with or without a tokenizer; a batch's first prompt.
    assert engine_ids({"prompt": [[5, 6, 7], "x"]}, "completion") == [5, 6, 7]
    # Trusted hints: stand-in ids of their block ids (the simulator's too); untrusted, never read.
    ext = {"prompt": "", "x_tandem": {"hash_ids": [7, 8, 9], "prompt_tokens": 10, "block_size": 4}}
    rreq = routed(ext, "completion", trust_hints=True)
    assert rreq.tokens is not None and list(rreq.tokens.ids) == block_id_tokens([7, 8, 9], 4, 10) == [7] * 4 + [8] * 4
    assert engine_ids(ext, "completion") == []


def test_the_ids_are_computed_only_when_an_exact_view_asks(monkeypatch) -> None:
    import tandem.router.admission as admission

    asked: list[str] = []
    monkeypatch.setattr(admission, "piece_ids", lambda pieces: asked.append("ids") or [1] * len(pieces))
    rreq = routed({"prompt": "a b c"}, "completion")
    assert asked == [] and rreq.tokens is not None
    assert list(rreq.tokens.ids) == [1, 1, 1] and asked == ["ids"]
