"""The engine's prefix cache: GPU blocks shared with running requests, and an optional host tier.

Why not a plain LRU sized "capacity - reserved": a running request's prompt blocks *are* cache
blocks (vLLM and SGLang share them by reference count), so subtracting every running request's
whole reservation from the cache's room counts those blocks twice and, near saturation, leaves
the cache almost nothing. Here GPU memory is split the way the engines split it:

* **pinned** blocks: cached blocks that at least one running request uses (reference counted).
  They stay matchable and are never evicted while in use;
* **free** blocks: cached blocks no running request uses, in LRU order: the only evictable part;
* the running requests' KV that is *not* a cache block (prompt not yet computed, reserved output).

The engine gives the free list whatever GPU memory the other two leave (:meth:`fit`). A block
evicted from the free list moves to the **host tier** (an LRU in host memory, as in Mooncake's
KVCache store, vLLM + LMCache CPU offload or SGLang HiCache) when one is configured; a later hit
there is loaded back over PCIe instead of being recomputed. The host tier keeps its copy when a
block is loaded (it is a store, not a swap space), so a block evicted again costs no new copy.

With ``events=True`` the cache also keeps the journal a vLLM engine publishes as KV-cache events
(``tandem.kvevents``): full blocks stored on GPU, moved to the host tier (medium ``CPU``, as
vLLM's CPU offloading reports them), removed from either, and the whole cache cleared. The caller
(``tandem sim``) takes the journal after each engine step and publishes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.blockcache import BlockCache
from tandem.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Leading blocks of a request found in the cache, and how many of their tokens came from host."""

    blocks: int
    tokens: int
    host_tokens: int


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What a KV-cache event says of a full block: its parent block and its token ids."""

    parent: int | None
    tokens: tuple[int, ...]


class EngineKVCache:
    __slots__ = ("_free", "_meta", "_pinned", "events", "free_tokens", "host", "pinned_tokens")

    def __init__(self, host_capacity_tokens: int = 0, events: bool = False) -> None:
        if host_capacity_tokens < 0:
            raise ValueError("host_cache_tokens must be >= 0")
        self._free: OrderedDict[int, int] = OrderedDict()  # hash -> size, least recently used first
        self._pinned: dict[int, list[int]] = {}  # hash -> [size, running requests using it]
        self.free_tokens = 0
        self.pinned_tokens = 0
        self.host = BlockCache(host_capacity_tokens, record_evictions=events) if host_capacity_tokens else None
        self.events: list[KVEvent] | None = [] if events else None  # the journal (None: not kept)
        self._meta: dict[int, BlockMeta] = {}  # full blocks held on GPU or host, while events are kept

    def take_events(self) -> list[KVEvent]:
        """The journal since the last call (empty when events are not kept)."""
        if not self.events:
            return []
        out, self.events = self.events, []
        return out

    def _stored(self, hashes: Sequence[int], medium: str) -> None:
        """Journal blocks newly held on ``medium``, one event per run of chained full blocks."""
        assert self.events is not None
        run: list[int] = []
        for h in hashes:
            meta = self._meta.get(h)
            if meta is None:
                self._flush(run, medium)
                continue
            if run and meta.parent != run[-1]:
                self._flush(run, medium)
            run.append(h)
        self._flush(run, medium)

    def _flush(self, run: list[int], medium: str) -> None:
        if not run:
            return
        assert self.events is not None
        metas = [self._meta[h] for h in run]
        tokens = tuple(t for m in metas for t in m.tokens)
        self.events.append(BlockStored(tuple(run), metas[0].parent, tokens, len(metas[0].tokens), medium))
        run.clear()

    def _removed(self, h: int, medium: str) -> None:
        assert self.events is not None
        if h in self._meta:
            self.events.append(BlockRemoved((h,), medium))
            if h not in self and (self.host is None or h not in self.host):
                del self._meta[h]

    def clear(self) -> None:
        """Drop every cached block no running request uses, GPU and host (``/reset_prefix_cache``)."""
        self._free.clear()
        self.free_tokens = 0
        if self.host is not None:
            self.host.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())
            self._meta = {h: m for h, m in self._meta.items() if h in self._pinned}

    @property
    def gpu_tokens(self) -> int:
        return self.free_tokens + self.pinned_tokens

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._pinned or block_hash in self._free

    def peek(self, hashes: Sequence[int]) -> PrefixHit:
        """The longest prefix held on GPU or host, without changing anything."""
        blocks = tokens = host_tokens = 0
        for h in hashes:
            if h in self._pinned:
                size = self._pinned[h][0]
            elif h in self._free:
                size = self._free[h]
            elif self.host is not None and h in self.host:
                size = self.host.peek_prefix((h,))[1]
                host_tokens += size
            else:
                break
            blocks += 1
            tokens += size
        return PrefixHit(blocks, tokens, host_tokens)

    def acquire(self, hashes: Sequence[int]) -> PrefixHit:
        """Pin the longest cached prefix for a request being admitted; host blocks are loaded to GPU."""
        hit = self.peek(hashes)
        loaded: list[int] = []
        for h in hashes[:hit.blocks]:
            entry = self._pinned.get(h)
            if entry is not None:
                entry[1] += 1
                continue
            size = self._free.pop(h, None)
            if size is not None:
                self.free_tokens -= size
            else:  # in the host tier (peek said so): copy it back, keep the host copy
                assert self.host is not None
                size = self.host.match_prefix((h,))[1]
                loaded.append(h)
            self._pinned[h] = [size, 1]
            self.pinned_tokens += size
        if loaded and self.events is not None:
            self._stored(loaded, "GPU")
        return hit

    def add_pinned(self, hashes: Sequence[int], sizes: Sequence[int],
                   metas: Sequence[BlockMeta | None] | None = None) -> None:
        """A request finished its prefill: its newly computed blocks become cache blocks it pins.

        A block another request computed meanwhile is shared (the duplicate is dropped). ``metas``
        (parent and tokens of each full block) feed the event journal."""
        new: list[int] = []
        for i, (h, size) in enumerate(zip(hashes, sizes, strict=True)):
            entry = self._pinned.get(h)
            if entry is not None:
                entry[1] += 1
                continue
            old = self._free.pop(h, None)
            if old is not None:
                self.free_tokens -= old
            elif self.events is not None and metas is not None and (meta := metas[i]) is not None:
                self._meta.setdefault(h, meta)
                new.append(h)
            self._pinned[h] = [size, 1]
            self.pinned_tokens += size
        if new:
            self._stored(new, "GPU")

    def release(self, hashes: Sequence[int]) -> None:
        """A request left: unpin its blocks; the unused ones join the free list.

        Tail blocks are freed first so they are evicted before the shared head (as vLLM does)."""
        for h in reversed(hashes):
            entry = self._pinned[h]
            entry[1] -= 1
            if entry[1] == 0:
                del self._pinned[h]
                self.pinned_tokens -= entry[0]
                self._free[h] = entry[0]
                self.free_tokens += entry[0]

    def fit(self, free_limit_tokens: int) -> int:
        """Evict least recently used free blocks (to the host tier, if any) until at most
        ``free_limit_tokens`` remain; returns the tokens evicted from GPU."""
        evicted = 0
        limit = max(0, free_limit_tokens)
        while self.free_tokens > limit:
            h, size = self._free.popitem(last=False)
            self.free_tokens -= size
            evicted += size
            if self.host is not None:
                offloaded = h not in self.host
                self.host.insert((h,), (size,))
                if self.events is not None:
                    self._journal_eviction(h, offloaded)
            elif self.events is not None:
                self._removed(h, "GPU")
        return evicted

    def _journal_eviction(self, h: int, offloaded: bool) -> None:
        """A block left GPU for the host tier, which may have evicted others to make room."""
        assert self.host is not None and self.host.evicted is not None
        if offloaded and h in self.host:
            self._stored((h,), "CPU")
        self._removed(h, "GPU")
        for gone in self.host.evicted:
            self._removed(gone, "CPU")
        self.host.evicted.clear()
