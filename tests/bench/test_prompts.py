"""Trace requests become prompt text whose prefixes and lengths match the trace."""

from __future__ import annotations

from tandem.bench.prompts import VOCABULARY, trace_prompt
from tandem.prefix import count_tokens, text_block_hashes
from tandem.traces import TraceRequest


def test_word_count_is_the_trace_length_and_every_word_is_one_token() -> None:
    for n in (1, 511, 512, 513, 2000):
        req = TraceRequest(0.0, n, 10, hash_ids=tuple(range(-(-n // 512))))
        text = trace_prompt(req, 0)
        assert count_tokens(text) == n
        assert len(text.split()) == n
    assert len(set(VOCABULARY)) == len(VOCABULARY) == 4096


def test_shared_block_ids_give_shared_prefix_blocks_and_nothing_more() -> None:
    a = trace_prompt(TraceRequest(0.0, 1100, 1, hash_ids=(7, 8, 9)), 0)
    b = trace_prompt(TraceRequest(0.0, 1100, 1, hash_ids=(7, 8, 10)), 1)
    c = trace_prompt(TraceRequest(0.0, 1100, 1, hash_ids=(6, 8, 9)), 2)
    _, ha = text_block_hashes(a, 512)
    _, hb = text_block_hashes(b, 512)
    _, hc = text_block_hashes(c, 512)
    assert ha[:2] == hb[:2]  # blocks 7, 8 shared: the same prefix
    assert not set(ha) & set(hc)  # a different first block: the chain shares nothing


def test_requests_without_block_ids_share_no_text() -> None:
    a = trace_prompt(TraceRequest(0.0, 600, 1), 0)
    b = trace_prompt(TraceRequest(0.0, 600, 1), 1)
    assert a != b and trace_prompt(TraceRequest(0.0, 600, 1), 0) == a
    assert not set(text_block_hashes(a, 16)[1]) & set(text_block_hashes(b, 16)[1])


def test_the_tiny_vllm_model_spells_each_trace_word_as_one_token(tmp_path) -> None:
    """The real-vLLM tier's tokenizer (bench/tinymodel.py) learnt every trace word: a trace prompt is
    exactly its input_length tokens on the real engine too."""
    from tokenizers import Tokenizer

    from tandem.bench import tinymodel

    tok = Tokenizer.from_file(str(tinymodel.build(tmp_path / "model") / "tokenizer.json"))
    assert all(len(tok.encode(" " + w).ids) == 1 and len(tok.encode(w).ids) == 1 for w in VOCABULARY)
    req = TraceRequest(0.0, 1300, 10, hash_ids=(3, 4, 5))
    assert len(tok.encode(trace_prompt(req, 0)).ids) == 1300
