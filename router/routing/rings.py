"""Consistent-hash rings: DualMap's two independent candidate maps.

Each instance owns ``vnodes`` points on a ring; a key belongs to the owner of the first point at
or after the key's own hash. Two rings with independent hash functions (xxh64 and xxh3, seeded)
give every key two candidates that are statistically independent, so the "power of two choices"
holds, while keeping the consistent-hash property that one join or leave moves only the keys of
the points it adds or removes: about 1/(N+1) per ring, 2/(N+1) for the candidate pair.

Lookups are a bisect over a sorted list of points (O(log(N x vnodes))). Membership changes merge
or filter the sorted arrays, O(N x vnodes), which only happens when an instance joins or leaves.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator

import xxhash

HashFn = Callable[[bytes, int], int]


# The C functions themselves (no Python wrapper frame on the decision path).
XXH64: HashFn = xxhash.xxh64_intdigest
XXH3: HashFn = xxhash.xxh3_64_intdigest


class HashRing:
    __slots__ = ("_hash", "_members", "_owners", "_points", "_seed", "vnodes")

    def __init__(self, hash_fn: HashFn, seed: int, vnodes: int) -> None:
        if vnodes <= 0:
            raise ValueError("vnodes must be positive")
        self._hash = hash_fn
        self._seed = seed
        self.vnodes = vnodes
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: set[str] = set()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._members

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def hash_key(self, key: int) -> int:
        return self._hash((key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), self._seed)

    def add(self, instance_id: str) -> None:
        if instance_id in self._members:
            return
        self._members.add(instance_id)
        new = [(self._hash(f"{instance_id}#{v}".encode(), self._seed), instance_id) for v in range(self.vnodes)]
        # Timsort merges the two sorted runs in linear time.
        merged = sorted([*zip(self._points, self._owners, strict=True), *sorted(new)])
        self._points = [p for p, _ in merged]
        self._owners = [o for _, o in merged]

    def remove(self, instance_id: str) -> None:
        if instance_id not in self._members:
            return
        self._members.discard(instance_id)
        kept = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != instance_id]
        self._points = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def sync(self, instance_ids: Iterable[str]) -> None:
        """Make the membership equal to ``instance_ids``, touching only the difference."""
        wanted = set(instance_ids)
        for gone in sorted(self._members - wanted):
            self.remove(gone)
        for new in sorted(wanted - self._members):
            self.add(new)

    def owner(self, key: int) -> str | None:
        if not self._points:
            return None
        i = bisect_right(self._points, self.hash_key(key))
        return self._owners[i if i < len(self._owners) else 0]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct owners in ring order from the key's position (the owner first)."""
        owners = self._owners
        n = len(owners)
        if not n:
            return
        start = bisect_right(self._points, self.hash_key(key))
        seen: set[str] = set()
        total = len(self._members)
        for step in range(n):
            o = owners[(start + step) % n]
            if o not in seen:
                seen.add(o)
                yield o
                if len(seen) == total:
                    return

    def first(self, key: int, ok: Callable[[str], bool]) -> str | None:
        """The first owner in ring order that passes ``ok`` (skips unhealthy or excluded instances)."""
        owners = self._owners
        n = len(owners)
        if not n:
            return None
        start = bisect_right(self._points, self.hash_key(key))
        o = owners[start if start < n else 0]
        if ok(o):  # the common case, without building a seen-set
            return o
        for o in self.walk(key):
            if ok(o):
                return o
        return None


class DualRing:
    """Two rings with independent hash functions; ``candidates`` gives two distinct instances."""

    __slots__ = ("a", "b")

    def __init__(self, vnodes: int, seed: int = 0) -> None:
        self.a = HashRing(XXH64, seed, vnodes)
        self.b = HashRing(XXH3, seed ^ 0x5BD1E995, vnodes)

    def __len__(self) -> int:
        return len(self.a)

    @property
    def members(self) -> frozenset[str]:
        return self.a.members

    def add(self, instance_id: str) -> None:
        self.a.add(instance_id)
        self.b.add(instance_id)

    def remove(self, instance_id: str) -> None:
        self.a.remove(instance_id)
        self.b.remove(instance_id)

    def sync(self, instance_ids: Iterable[str]) -> None:
        ids = list(instance_ids)
        self.a.sync(ids)
        self.b.sync(ids)

    def candidates(self, key: int, ok: Callable[[str], bool]) -> tuple[str, str] | None:
        """The first usable owner on ring A and on ring B; on a collision, ring B's next distinct owner.

        With a single usable instance both candidates are that instance; None when there is none.
        """
        first = self.a.first(key, ok)
        if first is None:
            return None
        second = self.b.owner(key)
        if second == first or second is None or not ok(second):
            second = self.b.first(key, lambda o: o != first and ok(o))
        return first, second if second is not None else first
