"""Prompt -> tokens -> chained block hashes, shared by the engine simulator and the router.

Block i's hash covers blocks 0..i, so two prompts share a block hash exactly when they share the
whole prefix up to that block: the property both prefix caches and prefix-affinity routing need.
Without the engine's tokenizer, text is split into word and punctuation pieces: cheap, stable
across processes and machines, and close enough to a BPE count for routing and simulation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import xxhash

_PIECE = re.compile(r"\w+|[^\w\s]")
_SEED = 0x7A3D


_SPACE = re.compile(r"\s")
_WINDOW = 1 << 14


def tokenize(text: str) -> list[str]:
    """Word and punctuation pieces. A long text is cut into ~16 KiB windows at whitespace (no piece
    spans whitespace: the pieces are the same), because one regex call holds the interpreter lock
    throughout: between windows, other threads (a gateway's event loop) get their turn."""
    if len(text) <= _WINDOW:
        return _PIECE.findall(text)
    out: list[str] = []
    start, n = 0, len(text)
    while start < n:
        end = start + _WINDOW
        if end < n:
            space = _SPACE.search(text, end)
            end = space.start() if space else n
        out.extend(_PIECE.findall(text, start, end))
        start = end
    return out


def count_tokens(text: str) -> int:
    return sum(1 for _ in _PIECE.finditer(text))


def chain_hashes(block_ids: Iterable[int | str | bytes]) -> list[int]:
    """Chain per-block identifiers (e.g. Mooncake ``hash_ids``) into prefix hashes."""
    out: list[int] = []
    h = xxhash.xxh64(seed=_SEED)
    for block in block_ids:
        data = block if isinstance(block, bytes) else str(block).encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
        out.append(h.intdigest())
    return out


def token_block_hashes(tokens: Sequence[str], block_size: int) -> list[int]:
    """Chained hashes of the full ``block_size``-token blocks of ``tokens``; a partial tail is not hashed."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    full = len(tokens) // block_size
    return chain_hashes("\x1f".join(tokens[i * block_size:(i + 1) * block_size]) for i in range(full))


def text_block_hashes(text: str, block_size: int) -> tuple[int, list[int]]:
    """Token count and full-block chained hashes of a text prompt."""
    tokens = tokenize(text)
    return len(tokens), token_block_hashes(tokens, block_size)


_ID_MASK = (1 << 63) - 1
PIECE_ID_BITS = 31  # a piece's id: non-negative in a signed 32-bit int, as a vocabulary's token ids are


def piece_ids(pieces: Iterable[str]) -> list[int]:
    """Token ids of :func:`tokenize`'s pieces (a hash of each, the same in every process): ``tandem sim``'s
    vocabulary (its ``/tokenize``, the ids in its KV-cache events), and what the gateway, without the
    engine's tokenizer, matches those events with."""
    mask = (1 << PIECE_ID_BITS) - 1
    return [xxhash.xxh32_intdigest(piece.encode()) & mask for piece in pieces]


def word_ids(text: str) -> list[int]:
    """:func:`piece_ids` of a text."""
    return piece_ids(tokenize(text))


def block_id_tokens(hash_ids: Sequence[int], block_size: int, prompt_tokens: int) -> list[int]:
    """Stand-in token ids of a prompt given as block ids (``x_tandem``): each full block is its id
    repeated, so prompts share keyed blocks exactly where they share block ids (as in the simulator,
    which reports these ids in its KV-cache events)."""
    full = min(len(hash_ids), prompt_tokens // block_size)
    out: list[int] = []
    for h in hash_ids[:full]:
        out.extend([h & _ID_MASK] * block_size)
    return out
