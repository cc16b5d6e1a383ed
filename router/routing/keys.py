"""DualMap's adaptive-depth routing key.

A fixed-depth prefix key is either too shallow (every conversation of a popular system prompt
lands on the same two instances: a hotspot) or too deep (requests that share a long prefix are
scattered and lose their cache hits). The key therefore starts at ``min_depth`` blocks and a
prefix that takes more than ``expand_share`` of a sliding window of recent requests is keyed one
block deeper, so its traffic splits along its sub-prefixes; once its share falls under
``shrink_share`` the expansion is undone. The gap between the two shares is hysteresis: a prefix
near one threshold does not flap.

Per request the work is proportional to the key's depth above ``min_depth`` (a few dict
operations), independent of the number of instances.
"""

from __future__ import annotations

from collections import deque

from tandem.router.routing.config import KeyParams
from tandem.router.routing.types import RouteRequest

_MASK64 = (1 << 64) - 1


class AdaptiveKeyer:
    """Sliding-window prefix popularity and the set of prefixes keyed one block deeper."""

    __slots__ = ("_counts", "_expand_above", "_expanded", "_min_depth", "_shrink_below", "_window",
                 "_window_size")

    def __init__(self, params: KeyParams) -> None:
        self._min_depth = params.key_min_depth
        self._window_size = params.key_window
        # Thresholds in requests against the full window, so a half-empty window at start-up does
        # not read one request as a 100% share.
        self._expand_above = params.key_expand_share * params.key_window
        self._shrink_below = params.key_shrink_share * params.key_window
        self._window: deque[tuple[int, ...]] = deque()
        self._counts: dict[int, int] = {}  # prefix hash -> window requests whose key path passes it
        self._expanded: set[int] = set()

    @property
    def expanded(self) -> frozenset[int]:
        return frozenset(self._expanded)

    def count(self, prefix: int) -> int:
        return self._counts.get(prefix, 0)

    def key(self, req: RouteRequest) -> tuple[int, int]:
        """(key, depth in blocks) without recording the request; depth 0 means the fallback key."""
        hashes = req.block_hashes
        n = len(hashes)
        if n < self._min_depth:
            return req.fallback_key & _MASK64, 0
        depth = self._min_depth
        key = hashes[depth - 1]
        expanded = self._expanded
        while depth < n and key in expanded:
            key = hashes[depth]
            depth += 1
        return key, depth

    def observe(self, req: RouteRequest) -> int:
        """Key the request, record it in the window and adapt; returns the key."""
        key, depth = self.key(req)
        path = tuple(req.block_hashes[self._min_depth - 1:depth]) if depth else ()
        counts = self._counts
        for p in path:
            counts[p] = counts.get(p, 0) + 1
        self._window.append(path)
        if len(self._window) > self._window_size:
            self._forget(self._window.popleft())
        if depth and depth < len(req.block_hashes) and counts[key] > self._expand_above:
            self._expanded.add(key)
        return key

    def _forget(self, path: tuple[int, ...]) -> None:
        counts = self._counts
        for p in path:
            c = counts[p] - 1
            if c:
                counts[p] = c
            else:
                del counts[p]
            if c < self._shrink_below:
                self._expanded.discard(p)
