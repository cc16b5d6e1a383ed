"""The pure pieces that put the gateway in front of real vLLM (issue 21): what it reads of a request,
how it keys a prompt, what of a stream is a token, what the one-token prefill leg may not carry, and
the observations' replica of an engine's prefix cache. The recorded vLLM 0.32 streams under
tests/fixtures/vllm-0.32 are the real engine's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.blockcache import BlockCache
from tandem.router.admission import Refusal, route_request
from tandem.router.observations import EngineKey, TokenCounter, engine_hit_tokens
from tandem.router.pd_bodies import prefill_blind_spots, vllm_prefill_body
from tandem.router.proxy import sse_comments_only
from tandem.router.requestview import RequestView, read_view
from tandem.router.tokenizer import EngineTokenizer, JinjaChatTemplate, Message, load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-0.32"


def view(data: dict, kind: str = "completion") -> RequestView:
    v = read_view({"model": "m", **data}, kind)  # type: ignore[arg-type]
    assert isinstance(v, RequestView), v
    return v


# --- what the gateway reads -----------------------------------------------------------------------


def test_every_prompt_shape_vllm_takes_is_read() -> None:
    assert view({"prompt": "hi there"}).prompts == ("hi there",)
    assert view({"prompt": [11, 12, 13]}).prompts == ((11, 12, 13),)
    assert view({"prompt": ["a b", "c d"]}).prompts == ("a b", "c d")
    assert view({"prompt": [[1, 2], [3]]}).prompts == ((1, 2), (3,))
    assert view({"prompt": ["a", [1, 2]]}).prompts == ("a", (1, 2))
    # A shape no engine takes is not the gateway's to refuse: keyed as empty, judged by the engine.
    assert view({"prompt": {"x": 1}}).prompts == () and view({}).prompts == ()


def test_any_role_and_any_field_pass_only_the_model_is_required() -> None:
    v = view({"messages": [{"role": "function", "name": "f", "content": "42"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                           "not a message"], "temperature": -1, "max_tokens": "lots", "n": 0, "stream": "true"},
             "chat")
    assert v.messages == (Message("function", "42"), Message("user", "a\nb"))
    assert (v.output_limit, v.n, v.stream) == (0, 1, True)  # unusable numbers: no limit, one choice
    assert isinstance(read_view({"prompt": "x"}, "completion"), Refusal)
    assert read_view([1, 2], "completion") == Refusal("body: a JSON object is required")
    bad = read_view({"model": "m", "x_tandem": {"hash_ids": [1, 2], "prompt_tokens": 10}}, "completion")
    assert isinstance(bad, Refusal) and bad.param == "x_tandem"


def test_responses_api_reads_instructions_and_input_messages() -> None:
    v = view({"instructions": "be brief", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hello"}]}, {"type": "function_call_output", "output": "x"}],
        "max_output_tokens": 7}, "responses")
    assert v.messages == (Message("system", "be brief"), Message("user", "hello")) and v.output_limit == 7
    assert view({"input": "hi"}, "responses").messages == (Message("user", "hi"),)


# --- keying -----------------------------------------------------------------------------------------


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> EngineTokenizer:
    """A word-level tokenizer.json with a chat template beside it, as a model folder has them."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", "c", "d", "<|user|>", "<|assistant|>", "<|function|>"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")}))
    return load_tokenizer(tmp_path)  # a folder: its tokenizer.json


def test_token_ids_key_like_the_same_text_through_the_engine_tokenizer(word_tokenizer: EngineTokenizer) -> None:
    text = " ".join(["a", "b", "c", "d"] * 4)
    by_text, _ = route_request(view({"prompt": text}), 4, word_tokenizer)
    ids = [int(t) for t in word_tokenizer.encode(text, special=True)]
    by_ids, _ = route_request(view({"prompt": ids}), 4, word_tokenizer)
    assert by_ids.block_hashes == by_text.block_hashes and len(by_ids.block_hashes) == 4
    assert by_ids.prompt_tokens == by_text.prompt_tokens == 16
    # Without a tokenizer too: ids are hashed as given.
    assert route_request(view({"prompt": ids}), 4)[0].block_hashes == by_ids.block_hashes


def test_a_batch_is_keyed_on_its_first_prompt_and_counts_every_prompt(word_tokenizer: EngineTokenizer) -> None:
    first, _ = route_request(view({"prompt": "a b c d a b c d"}), 4, word_tokenizer)
    batch, _ = route_request(view({"prompt": ["a b c d a b c d", "c d", [1, 2, 3]]}), 4, word_tokenizer)
    assert batch.block_hashes == first.block_hashes and batch.prompt_tokens == 8 + 2 + 3


def test_chat_is_keyed_on_the_rendered_template_and_approximated_without_one(
        word_tokenizer: EngineTokenizer) -> None:
    messages = [{"role": "function", "content": "a b"}, {"role": "user", "content": "c d"}]
    rreq, _ = route_request(view({"messages": messages}, "chat"), 4, word_tokenizer)
    # <|function|> a b <|user|> c d <|assistant|>: the template's markers are tokens the engine sees.
    assert rreq.prompt_tokens == 7
    approx, _ = route_request(view({"messages": messages}, "chat"), 4)
    assert approx.prompt_tokens != rreq.prompt_tokens  # the gateway's own word pieces of its own rendering
    assert JinjaChatTemplate("{{ raise_exception('no') }}", "", "").render([Message("user", "x")]) is None


def test_lone_surrogates_are_refused_wherever_the_gateway_reads_text() -> None:
    refused = route_request(view({"messages": [{"role": "user", "content": "a \ud800"}]}, "chat"), 4)
    assert isinstance(refused, Refusal) and refused.param == "messages"


def test_the_engine_key_hashes_the_first_prompt_in_the_engine_blocks(word_tokenizer: EngineTokenizer) -> None:
    text = " ".join(["a", "b", "c", "d"] * 4)
    rreq, key = route_request(view({"prompt": text}), 8, word_tokenizer, engine_block=4)
    assert key is not None and key.block == 4 and len(key.hashes) == 4 and len(rreq.block_hashes) == 2
    assert route_request(view({"prompt": text}), 8, word_tokenizer)[1] is None  # block size not scraped yet


# --- the engine's own prefix cache, replicated for the observations ----------------------------------


def test_engine_hits_count_whole_engine_blocks_before_the_last_prompt_token() -> None:
    cache = BlockCache(1000)
    key = EngineKey(128, (1, 2, 3))  # a 3-block, 400-token prompt
    assert engine_hit_tokens(cache, key, 400) == 0  # cold
    assert engine_hit_tokens(cache, key, 400) == 384  # its 3 full blocks
    assert engine_hit_tokens(cache, EngineKey(128, (1, 2, 3)), 384) == 256  # the last token is computed
    assert engine_hit_tokens(cache, EngineKey(128, (1, 2, 9)), 400) == 256  # a shared 2-block prefix


# --- streams ---------------------------------------------------------------------------------------


def feed_in_pieces(data: bytes, size: int) -> TokenCounter:
    counter = TokenCounter()
    for i in range(0, len(data), size):
        counter.feed(data[i:i + size])
    return counter


@pytest.mark.parametrize("size", [1, 7, 100, 1 << 20])
def test_token_counter_on_real_vllm_streams(size: int) -> None:
    """8 tokens each (the recorded requests asked for 8 with ignore_eos), however the bytes are cut."""
    chat = (FIXTURES / "chat-stream-no-usage.sse").read_bytes()
    counter = feed_in_pieces(chat, size)
    assert counter.usage is None and counter.tokens == 8  # not 9: the role-only chunk is no token
    assert feed_in_pieces((FIXTURES / "chat-stream.sse").read_bytes(), size).tokens == 8  # from the usage
    keepalive = b": keep-alive\n\n" + chat.replace(b"\n\ndata:", b"\n\n: keep-alive\n\ndata:", 3)
    assert feed_in_pieces(keepalive, size).tokens == 8


def test_role_chunks_of_several_choices_are_no_tokens() -> None:
    roles = {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(2)]}
    token = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}  # role and a token
    counter = feed_in_pieces(f"data: {json.dumps(roles)}\n\ndata: {json.dumps(token)}\n\n".encode(), 5)
    assert counter.tokens == 1


def test_comments_alone_are_not_a_stream_start() -> None:
    assert sse_comments_only(b": keep-alive\n\n") and sse_comments_only(b": keep-alive\n\n: keep")
    assert not sse_comments_only(b": keep-alive\n\ndata: {}") and not sse_comments_only(b"da")
    assert not sse_comments_only(b'{"id": "cmpl-1"}')  # a whole JSON answer is an answer


# --- the one-token prefill leg ---------------------------------------------------------------------


def test_prefill_leg_drops_min_tokens_and_keeps_the_rest() -> None:
    data = {"model": "m", "prompt": "x", "max_tokens": 16, "min_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.5}
    body = vllm_prefill_body(data)
    assert body["max_tokens"] == 1 and "min_tokens" not in body and "stream_options" not in body
    assert body["temperature"] == 0.5 and data["min_tokens"] == 12  # the decode leg keeps it


@pytest.mark.parametrize(("data", "field"), [
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
])
def test_what_only_the_decode_leg_would_see_is_checked_first(data: dict, field: str) -> None:
    blind = prefill_blind_spots(data, 4096)
    assert blind is not None and blind[1] == field
    assert prefill_blind_spots({"max_tokens": 5000}, None) is None  # no context length known: the engine's call
    assert prefill_blind_spots({"max_tokens": 16, "min_tokens": 12, "temperature": -1}, 4096) is None
