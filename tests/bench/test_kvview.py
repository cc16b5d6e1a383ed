"""``tandem bench kv-view``'s workload and pooling (the bench needs real vLLM: docs/benchmarks.md has its runs)."""

from __future__ import annotations

import itertools

from tandem.bench.kvview import conversations, pooled


def test_conversations_share_system_prompts_and_grow_turn_by_turn() -> None:
    convs = conversations(groups=2, per_group=3, turns=4, system_words=50, turn_words=10)
    assert len(convs) == 6 and all(len(c) == 4 for c in convs)
    for c in convs:
        for earlier, later in itertools.pairwise(c):
            assert later.startswith(earlier) and len(later.split()) == len(earlier.split()) + 10
    system = [c[0].split()[:50] for c in convs]
    assert system[0] == system[1] == system[2] != system[3] == system[4] == system[5]
    assert convs[0][0] != convs[1][0]  # each conversation its own turns


def test_repeats_pool_over_all_tokens() -> None:
    def run(est: float, vllm: float, tokens: int) -> dict:
        return {"requests": 60, "prompt_tokens": tokens, "vllm_queries": tokens, "estimated_hit_ratio": est,
                "vllm_hit_ratio": vllm, "gap_points": round(100 * (est - vllm), 2)}

    out = pooled([run(0.6, 0.5, 1000), run(0.3, 0.4, 3000)])
    assert out["requests"] == 120 and out["estimated_hit_ratio"] == 0.375 and out["vllm_hit_ratio"] == 0.425
    assert out["gap_points"] == -5.0 and out["gap_points_range"] == [-10.0, 10.0] and len(out["runs"]) == 2
