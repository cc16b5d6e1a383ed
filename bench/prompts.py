"""Trace requests as prompt text: what the demo and the HTTP benches send instead of simulator hints.

Traces give each prompt as prefix-block ids (Mooncake ``hash_ids``, 512 tokens a block) and a
length. Real clients send text, and the gateway, the peer routers and real engines key on text,
so each block id becomes a fixed run of words: equal ids give equal text, hence equal prefixes
for every prefix cache and every router, and the word count equals the trace's ``input_tokens``
(one word is one token for the gateway's word splitter and for the simulator; for a BPE tokenizer
trained on :data:`VOCABULARY`, such as the tiny model of the real-vLLM tier, each word is one
token too). A request without block ids (Azure traces) gets words no other request has.
"""

from __future__ import annotations

from functools import lru_cache

import xxhash

from tandem.traces import TraceRequest

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)  # 75


def _vocabulary() -> tuple[str, ...]:
    """4,096 distinct two- and three-syllable words, in a fixed order (no randomness: stable forever)."""
    words = [a + b for a in _SYLLABLES for b in _SYLLABLES]  # 5,625 two-syllable words
    return tuple(words[:4096])


VOCABULARY: tuple[str, ...] = _vocabulary()


@lru_cache(maxsize=8192)
def block_text(block_id: int, words: int) -> str:
    """The first ``words`` words of block ``block_id`` (a pure function of both: cached)."""
    seed = block_id & 0xFFFFFFFFFFFFFFFF
    return " ".join(VOCABULARY[xxhash.xxh64_intdigest(j.to_bytes(4, "little"), seed=seed) % len(VOCABULARY)]
                    for j in range(words))


def trace_prompt(req: TraceRequest, unique: int) -> str:
    """The prompt text of ``req``: its blocks' words, ``req.input_tokens`` words in all.

    ``unique`` (e.g. the request's index in the replay) names the words of a request without
    block ids, and of any tail its blocks do not cover, so that no other request shares them.
    """
    parts: list[str] = []
    left = req.input_tokens
    for block_id in req.hash_ids:
        if left <= 0:
            break
        n = min(req.block_size, left)
        parts.append(block_text(block_id, n))
        left -= n
    block = 0
    while left > 0:  # no block ids (or too few): words of this request alone
        n = min(req.block_size, left)
        parts.append(block_text(-(1 + unique) * 1_000_003 - block, n))
        left -= n
        block += 1
    return " ".join(parts)
