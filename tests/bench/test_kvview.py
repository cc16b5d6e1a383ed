"""``tandem bench kv-view``'s workload (the bench itself needs real vLLM: docs/benchmarks.md has its runs)."""

from __future__ import annotations

import itertools

from tandem.bench.kvview import conversations


def test_conversations_share_system_prompts_and_grow_turn_by_turn() -> None:
    convs = conversations(groups=2, per_group=3, turns=4, system_words=50, turn_words=10)
    assert len(convs) == 6 and all(len(c) == 4 for c in convs)
    for c in convs:
        for earlier, later in itertools.pairwise(c):
            assert later.startswith(earlier) and len(later.split()) == len(earlier.split()) + 10
    system = [c[0].split()[:50] for c in convs]
    assert system[0] == system[1] == system[2] != system[3] == system[4] == system[5]
    assert convs[0][0] != convs[1][0]  # each conversation its own turns
