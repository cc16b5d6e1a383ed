"""The gateway tokenizes as the engine does (``--tokenizer``), so the exact cache view can match
its prompts against the token ids the engine reports cached.

Checked against real vLLM 0.32's own answers recorded in ``tests/fixtures/vllm-0.32``: its
``/tokenize`` of a completion prompt and of chat messages (rendered by the model's chat template),
and the token ids of the KV blocks it stored for a chat request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.openai_api import ChatCompletionRequest, CompletionRequest
from tandem.prefix import block_id_tokens, word_ids
from tandem.router.admission import route_request
from tandem.router.tokens import EngineTokenizer

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32"


@pytest.fixture(scope="module")
def tokenizer() -> EngineTokenizer:
    from tandem.bench import tinymodel

    return EngineTokenizer.load(tinymodel.build() / "tokenizer.json")


@pytest.fixture(scope="module")
def exchanges() -> dict:
    return json.loads((FIXTURES / "exchanges.json").read_text())


def test_completion_and_chat_ids_are_vllms(tokenizer, exchanges) -> None:
    plain = exchanges["tokenize"]
    assert tokenizer.ids(CompletionRequest.model_validate(plain["request"])) == plain["body"]["tokens"]
    chat = exchanges["tokenize_chat"]
    ids = tokenizer.ids(ChatCompletionRequest.model_validate(chat["request"]))
    assert ids == chat["body"]["tokens"] and len(ids) == chat["body"]["count"]


def test_chat_ids_match_the_blocks_vllm_stored(tokenizer, exchanges) -> None:
    """The ``chat`` exchange made vLLM store one 128-token block: its tokens are our first 128."""
    decoded = json.loads((FIXTURES / "kv-events-decoded.json").read_text())
    stored = next(e for m in decoded if m["step"] == "chat" for e in m["payload"][1] if e["type"] == "BlockStored")
    ids = tokenizer.ids(ChatCompletionRequest.model_validate(exchanges["chat"]["request"]))
    assert ids is not None and ids[:128] == stored["token_ids"]


def test_no_exact_ids_without_a_template_or_for_parts(tmp_path, tokenizer) -> None:
    from tandem.bench import tinymodel

    parts = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tokenizer.ids(parts) is None
    bare = tmp_path / "tokenizer.json"
    bare.write_bytes((tinymodel.build() / "tokenizer.json").read_bytes())  # no tokenizer_config.json beside it
    no_template = EngineTokenizer.load(bare)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hello there"}])
    assert no_template.ids(chat) is None
    rreq = route_request(chat, 4, no_template)
    assert rreq.tokens is None and rreq.block_hashes  # still keyed for routing, on the shadow view
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    assert EngineTokenizer.load(bare).ids(chat) is None  # the template refused: no exact ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match="chat template"):
        EngineTokenizer.load(bare)


def test_route_request_carries_the_engine_token_ids() -> None:
    text = CompletionRequest(model="m", prompt="the model serves tokens")
    assert list(route_request(text, 4).tokens.ids) == word_ids("the model serves tokens")
    ext = CompletionRequest(model="m", x_tandem={"hash_ids": [7, 8, 9], "prompt_tokens": 10, "block_size": 4})
    rreq = route_request(ext, 512)
    assert list(rreq.tokens.ids) == block_id_tokens([7, 8, 9], 4, 10) == [7] * 4 + [8] * 4
