"""The exact cache view: which prompt prefixes an engine holds, from its own KV-cache events.

Why token keys, not the engine's block hashes: vLLM hashes a block as sha256 over its parent's
hash, its token ids and extra keys, seeded per deployment; SGLang differently again. A router
cannot compute those for a new prompt without copying each engine's hash function, version by
version. But ``BlockStored`` carries the blocks' token ids and their parent's hash, so the index
re-keys every stored block with a chain of its own over token ids (:func:`chain_keys`): key(block)
= xxh64(key(parent) || token ids). The gateway computes the same chain over the prompt's token
ids (the engine's tokenizer, ``--tokenizer``), in the engine's block size, and the longest prefix
of keys present is exactly the prefix the engine will find in its cache, up to tokenization: the
router and the engine must produce the same token ids (same tokenizer, same special tokens, same
chat template).

Bounded: at most ``capacity_blocks`` blocks per instance (oldest stored dropped first: that only
under-estimates). Blocks whose hash covers more than tokens (LoRA, multimodal, cache salt) and
blocks of KV-cache groups other than the first (hybrid models) are not indexed: a prompt's tokens
alone cannot tell whether it would hit them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import xxhash

from tandem.kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent
from tandem.kveviction import LruOrder, blocks_at_risk, new_blocks, surviving_prefix


class RouteRequestLike(Protocol):
    """What the view reads of a routing request (``tandem.router.routing.types.RouteRequest``)."""

    request_id: str
    prompt_tokens: int
    tokens: PromptTokens | None

_SEED = 0x6B76  # "kv"
ROOT = 0  # the parent key of a chain's first block


def chain_keys(token_ids: Sequence[int], block_size: int, parent: int = ROOT) -> list[int]:
    """Keys of the full ``block_size``-token blocks of ``token_ids``, chained from ``parent``.

    key = xxh64(previous key, 8 bytes LE || the block's token ids, 8 bytes LE each): packed once,
    hashed per block (~0.1 ms for 4k tokens)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(token_ids) // block_size * block_size
    buf = struct.pack(f"<{n}q", *token_ids[:n])
    step = block_size * 8
    out: list[int] = []
    key = parent
    for start in range(0, n * 8, step):
        key = xxhash.xxh64_intdigest(key.to_bytes(8, "little") + buf[start:start + step], _SEED)
        out.append(key)
    return out


class PromptTokens:
    """A prompt's token ids, produced on first use, and its chain keys per engine block size.

    Carried by a routing request so each candidate's exact view can look the prompt up in its own
    engine's block size (a mixed fleet may have 16-token and 128-token engines). Lazy: a pool
    without exact views never pays for the ids or the keys.
    """

    __slots__ = ("_ids", "_keys", "_make")

    def __init__(self, ids: Sequence[int] | None = None, make: Callable[[], Sequence[int]] | None = None) -> None:
        if (ids is None) == (make is None):
            raise ValueError("give ids or make, not both")
        self._ids = ids
        self._make = make
        self._keys: dict[int, list[int]] = {}

    @property
    def ids(self) -> Sequence[int]:
        if self._ids is None:
            assert self._make is not None
            self._ids, self._make = self._make(), None
        return self._ids

    def keys(self, block_size: int) -> list[int]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = chain_keys(self.ids, block_size)
        return keys


class BlockIndex:
    """One engine's cached blocks by token-chain key, maintained from its event stream.

    ``apply`` takes events in sequence order. A block whose parent is unknown (stored before the
    index started, or dropped by the bound) cannot be keyed and is skipped: the index only ever
    misses blocks, it never invents them. ``order`` ranks the cached keys by recency, for the
    eviction-aware estimate (:mod:`tandem.kveviction`).
    """

    __slots__ = ("_entries", "_media", "_present", "block_size", "capacity_blocks", "order", "skipped")

    def __init__(self, capacity_blocks: int = 65536) -> None:
        if capacity_blocks <= 0:
            raise ValueError("capacity_blocks must be positive")
        self.capacity_blocks = capacity_blocks
        self.block_size: int | None = None  # learned from the first BlockStored
        self._entries: dict[BlockHash, list[int]] = {}  # engine hash -> [key, media bits]; oldest first
        self._present: dict[int, int] = {}  # key -> engine blocks holding it (several with different salts)
        self._media: dict[str | None, int] = {}
        self.order = LruOrder()  # the keys of _present, least recently used first
        self.skipped = 0  # stored blocks not indexed (unknown parent, keyed, other group, bad shape)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return key in self._present

    def _bit(self, medium: str | None) -> int:
        bit = self._media.get(medium)
        if bit is None:
            bit = self._media[medium] = 1 << len(self._media)
        return bit

    def apply(self, events: Iterable[KVEvent]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                self.stored(e)
            elif isinstance(e, BlockRemoved):
                self.removed(e)
            elif isinstance(e, AllBlocksCleared):
                self.clear()

    def stored(self, e: BlockStored) -> None:
        n = len(e.block_hashes)
        if e.keyed or (e.group_idx or 0) != 0 or len(e.token_ids) != n * e.block_size:
            self.skipped += n
            return
        if e.parent_block_hash is None:
            parent = ROOT
        else:
            entry = self._entries.get(e.parent_block_hash)
            if entry is None:
                self.skipped += n
                return
            parent = entry[0]
        self.block_size = e.block_size
        bit = self._bit(e.medium)
        keys = chain_keys(e.token_ids, e.block_size, parent)
        entries, present = self._entries, self._present
        for h, key in zip(e.block_hashes, keys, strict=True):
            entry = entries.pop(h, None)  # re-inserted last: the newest stored
            if entry is None:
                entry = [key, 0]
                present[key] = present.get(key, 0) + 1
            entry[1] |= bit
            entries[h] = entry
        self.order.use(keys)
        while len(entries) > self.capacity_blocks:
            self._drop(next(iter(entries)))

    def removed(self, e: BlockRemoved) -> None:
        bit = self._bit(e.medium)
        for h in e.block_hashes:
            entry = self._entries.get(h)
            if entry is None:
                continue
            entry[1] &= ~bit
            if not entry[1]:
                self._drop(h)

    def _drop(self, h: BlockHash) -> None:
        key = self._entries.pop(h)[0]
        left = self._present[key] - 1
        if left:
            self._present[key] = left
        else:
            del self._present[key]
            self.order.discard(key)

    def clear(self) -> None:
        self._entries.clear()
        self._present.clear()
        self.order.clear()

    def prefix_blocks(self, keys: Sequence[int]) -> int:
        """Leading ``keys`` cached (a linear walk: after an eviction a chain may have gaps)."""
        n = 0
        for k in keys:
            if k not in self._present:
                break
            n += 1
        return n


class InflightBlocks:
    """Blocks of requests routed to an engine that have not reached its cache yet (counted per key).

    vLLM caches a prompt's blocks when it schedules the prompt, so a request sent right behind
    another with the same prefix hits; the events of the first arrive only after that. Counting
    the blocks of requests queued or in prefill there closes that window; they leave when the
    request's first token comes (its blocks are in the engine's events by then) or when it fails,
    is cancelled or moves.
    """

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._count)

    def __contains__(self, key: int) -> bool:
        return key in self._count

    def add(self, keys: Iterable[int]) -> None:
        count = self._count
        for k in keys:
            count[k] = count.get(k, 0) + 1

    def remove(self, keys: Iterable[int]) -> None:
        count = self._count
        for k in keys:
            left = count.get(k, 0) - 1
            if left > 0:
                count[k] = left
            else:
                count.pop(k, None)

    def clear(self) -> None:
        self._count.clear()


def hit_tokens(blocks: int, block_size: int, prompt_tokens: int) -> int:
    """Tokens an engine serves from ``blocks`` cached leading blocks: whole blocks, never the last
    prompt token (vLLM computes it to produce the first output token)."""
    if prompt_tokens <= 0:
        return 0
    return min(blocks, (prompt_tokens - 1) // block_size) * block_size


class EventCacheView:
    """Routing's exact view of one engine (the routing core's ``CacheView``): its event index plus
    the blocks of requests on their way there, less the blocks those requests will evict.

    ``hit_tokens`` answers None (the caller falls back to its shadow cache) until the event stream
    is in sync (``live``) and for a request without token ids. The engine's block size comes with
    its first ``BlockStored`` (or its /metrics); until then the engine holds nothing known: a miss.
    Token keys of a routed request are remembered by request id, so settling it removes exactly what
    routing it added, once. With the engine's capacity known (``engine_blocks``, from /metrics), a
    cached prefix counts only as far as the new blocks of the requests routed ahead of it leave it
    in the cache (:mod:`tandem.kveviction`); routing a request refreshes the recency of what it hits.
    """

    __slots__ = ("_changes", "_pending", "_routed", "engine_blocks", "index", "inflight", "live")

    def __init__(self, capacity_blocks: int = 65536) -> None:
        self.index = BlockIndex(capacity_blocks)
        self.inflight = InflightBlocks()
        self.live = False
        self.engine_blocks: int | None = None  # the engine's KV blocks (vLLM's num_gpu_blocks); None: unknown
        # request id -> (its keys, its new blocks, the first of them: its BlockStored says it started)
        self._routed: dict[str, tuple[list[int], int, int | None]] = {}
        self._changes = 0  # of _routed
        self._pending: tuple[int, int, int] = (-1, -1, 0)  # (order version, _changes, pending blocks)

    def engine_config(self, block_size: int | None, kv_blocks: int | None) -> None:
        """What the engine's /metrics tell (``CapacityAware``): its block size (in-flight blocks count
        before the first event) and its KV capacity (the eviction model's)."""
        if block_size and self.index.block_size is None:
            self.index.block_size = block_size
        if kv_blocks:
            self.engine_blocks = kv_blocks

    def _keys(self, req: RouteRequestLike) -> list[int] | None:
        bs = self.index.block_size
        if bs is None or req.tokens is None:
            return None
        return req.tokens.keys(bs)

    @property
    def pending_blocks(self) -> int:
        """New blocks the requests routed here will allocate, for those not started yet.

        Started: its first token came (settled), or the engine stored the first block it adds (a
        probe key), which comes first: the events leave the engine at the end of the step, the first
        token still has the API server and HTTP to cross, and in between the index already shows
        what the request allocated and evicted. O(requests routed here), once per change."""
        version = (self.index.order.version, self._changes)
        if self._pending[:2] != version:
            index = self.index
            total = sum(new for _, new, probe in self._routed.values() if probe is None or probe not in index)
            self._pending = (*version, total)
        return self._pending[2]

    def at_risk_blocks(self) -> int:
        """Cached blocks the requests routed here and not started yet are expected to evict."""
        return blocks_at_risk(self.engine_blocks, len(self.index), self.pending_blocks)

    def _prefix_blocks(self, keys: list[int]) -> int:
        order = self.index.order
        return surviving_prefix(keys, order, order.cutoff(self.at_risk_blocks()), self.inflight)

    def hit_tokens(self, req: RouteRequestLike) -> int | None:
        if not self.live or req.tokens is None:
            return None
        keys = self._keys(req)
        if keys is None:  # no block size yet: nothing stored, nothing routed with keys: a miss
            return 0
        assert self.index.block_size is not None
        return hit_tokens(self._prefix_blocks(keys), self.index.block_size, req.prompt_tokens)

    def routed(self, req: RouteRequestLike) -> None:
        keys = self._keys(req)
        if keys is None or req.request_id in self._routed:
            return
        bs = self.index.block_size
        assert bs is not None
        hit = self._prefix_blocks(keys)
        index, inflight = self.index, self.inflight
        index.order.touch(keys[:hit])
        new = new_blocks(req.prompt_tokens, bs, hit_tokens(hit, bs, req.prompt_tokens) // bs)
        # Neither cached nor coming with another request: only this one's start can store it.
        probe = next((k for k in keys[hit:] if k not in index and k not in inflight), None)
        self._routed[req.request_id] = (keys, new, probe)
        self._changes += 1
        inflight.add(keys)

    def settled(self, req: RouteRequestLike) -> None:
        routed = self._routed.pop(req.request_id, None)
        if routed is not None:
            keys = routed[0]
            self._changes += 1
            self.inflight.remove(keys)
            # Started: its blocks are cached and vLLM frees them together, tail first (their recency).
            self.index.order.touch(keys)

    def reset(self) -> None:
        """The engine's cache is gone (restart, reset): forget every block, cached or on its way."""
        self.index.clear()
        self.inflight.clear()
        self._routed.clear()
        self._changes += 1
