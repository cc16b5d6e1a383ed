"""The eviction-aware exact view (tandem.kveviction) on hand-built indexes."""

from __future__ import annotations

from tandem.kvevents import BlockRemoved, BlockStored
from tandem.kveviction import LruOrder, blocks_at_risk, new_blocks, surviving_prefix
from tandem.kvindex import EventCacheView, PromptTokens, chain_keys
from tandem.router.routing.capabilities import CapacityAware
from tandem.router.routing.types import RouteRequest

BS = 4


def _req(rid: str, toks: list[int]) -> RouteRequest:
    return RouteRequest(rid, len(toks), (), 512, 0.0, tokens=PromptTokens(toks))


def _conv(c: int, blocks: int) -> list[int]:
    """``blocks`` full blocks of conversation ``c`` plus one token (so every block can hit)."""
    return [c * 1000 + i for i in range(blocks * BS + 1)]


def _store(view: EventCacheView, toks: list[int], first_hash: int) -> None:
    n = len(toks) // BS
    view.index.stored(BlockStored(tuple(range(first_hash, first_hash + n)), None, tuple(toks[:n * BS]), BS))


def test_lru_order_ranks_chain_heads_newest_and_cuts_the_oldest() -> None:
    order = LruOrder()
    order.use([1, 2, 3])  # a chain: 3 (its tail) oldest, 1 newest
    order.use([7, 8])
    assert [k for k in (3, 2, 1, 8, 7) if order.rank(k) <= order.cutoff(5)] == [3, 2, 1, 8, 7]
    assert {k for k in (1, 2, 3, 7, 8) if order.rank(k) <= order.cutoff(2)} == {3, 2}
    assert order.cutoff(0) == 0 and order.cutoff(99) == order.cutoff(5)
    order.touch([2, 9])  # 9 is not cached: ignored; 2 becomes the newest
    assert 9 not in order and {k for k in (1, 2, 3, 7, 8) if order.rank(k) <= order.cutoff(2)} == {3, 1}
    order.discard(3)
    assert len(order) == 4 and order.rank(3) is None
    order.clear()
    assert len(order) == 0 and order.cutoff(3) == 0


def test_pure_rule() -> None:
    assert blocks_at_risk(None, 30, 100) == 0  # unknown capacity: no correction
    assert blocks_at_risk(33, 20, 12) == 0  # 12 free (one block is vLLM's null block)
    assert blocks_at_risk(33, 20, 15) == 3
    assert blocks_at_risk(33, 40, 5) == 5  # more indexed than the capacity says: no free room
    assert new_blocks(9, 4, 0) == 3 and new_blocks(9, 4, 2) == 1 and new_blocks(8, 4, 5) == 0
    order = LruOrder()
    order.use([1, 2, 3])
    assert surviving_prefix([1, 2, 3, 4], order, 0, ()) == 3
    assert surviving_prefix([1, 2, 3, 4], order, order.cutoff(1), ()) == 2  # the tail block is at risk
    assert surviving_prefix([1, 2, 3, 4], order, order.cutoff(1), {3, 4}) == 4  # on their way: never at risk
    assert surviving_prefix([1, 2, 3], order, order.cutoff(3), ()) == 0  # the head at risk: nothing


def _full_view(engine_blocks: int | None) -> tuple[EventCacheView, list[list[int]]]:
    """An engine whose cache holds conversations 0, 1, 2 (stored in that order, 4 blocks each)."""
    view = EventCacheView()
    view.live = True
    view.engine_config(BS, engine_blocks)
    convs = [_conv(c, 4) for c in range(3)]
    for c, toks in enumerate(convs):
        _store(view, toks, 100 * c + 1)
    return view, convs


def test_no_pressure_answers_as_before() -> None:
    for blocks in (None, 100):  # capacity unknown, or room for everything routed
        view, convs = _full_view(blocks)
        assert isinstance(view, CapacityAware)
        view.routed(_req("new", _conv(9, 6)))  # 7 new blocks
        assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [16, 16, 16]
        assert view.at_risk_blocks() == 0


def test_pressure_drops_the_oldest_blocks_first() -> None:
    view, convs = _full_view(1 + 12 + 3)  # 12 cached, 3 free
    view.routed(_req("new", _conv(9, 6)))  # 7 new blocks: 4 cached ones go
    assert view.pending_blocks == 7 and view.at_risk_blocks() == 4
    # Conversation 0 is the oldest: all its blocks are at risk, its first block included: no hit.
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [0, 16, 16]
    view.routed(_req("small", _conv(8, 1)))  # 2 more new blocks: conversation 1's tail (2 blocks) goes
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [0, 8, 16]
    view.settled(_req("new", []))  # it started: its blocks are in the events (or will be), not pending
    assert view.pending_blocks == 2 and view.at_risk_blocks() == 0
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [16, 16, 16]


def test_routing_a_hit_refreshes_it_and_evictions_clear_the_pressure() -> None:
    view, convs = _full_view(1 + 12 + 3)
    view.routed(_req("again0", convs[0]))  # hits all of conversation 0 (1 new block: its last token)
    view.routed(_req("new", _conv(9, 6)))  # 7 new: 5 at risk, now conversation 1 and one of 2
    assert view.at_risk_blocks() == 5
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [16, 0, 12]
    # The engine evicted them: the index shrank, the free room grew, nothing else is at risk.
    view.index.removed(BlockRemoved((101, 102, 103, 104, 204)))
    assert view.at_risk_blocks() == 0
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [16, 0, 12]
    view.reset()
    assert view.pending_blocks == 0 and len(view.index.order) == 0


def test_the_index_keeps_its_order_in_step_with_its_blocks() -> None:
    view, convs = _full_view(None)
    order = view.index.order
    assert len(order) == 12
    keys0 = chain_keys(convs[0], BS)
    assert order.rank(keys0[0]) > order.rank(keys0[3])  # a chain's head is newer than its tail
    view.index.removed(BlockRemoved((1,)))
    assert keys0[0] not in order and len(order) == 11
    view.index.clear()
    assert len(order) == 0


def test_a_started_request_makes_its_whole_chain_newest_head_last() -> None:
    view, convs = _full_view(1 + 12 + 3)
    longer = _conv(0, 6)  # conversation 0's next turn: its 4 cached blocks and 2 new ones
    view.routed(_req("turn", longer))
    keys = chain_keys(longer, BS)
    view.index.stored(BlockStored((5, 6), 4, tuple(longer[16:24]), BS))  # its new blocks, stored newest
    order = view.index.order
    assert order.rank(keys[5]) > order.rank(keys[0])  # until it starts, its head is older than its tail
    view.settled(_req("turn", []))  # first token: vLLM will free the chain together, tail first
    assert [order.rank(k) for k in keys] == sorted((order.rank(k) for k in keys), reverse=True)
    assert min(order.rank(k) for k in keys) > max(order.rank(k) for k in chain_keys(convs[2], BS))


def test_a_request_stops_pending_once_the_engine_stores_its_first_new_block() -> None:
    view, convs = _full_view(1 + 12 + 3)
    new = _conv(9, 6)
    view.routed(_req("new", new))
    assert view.pending_blocks == 7 and view.hit_tokens(_req("c0", convs[0])) == 0
    # Its step's events (its blocks stored, conversation 0 evicted) come before its first token.
    view.index.removed(BlockRemoved((1, 2, 3, 4)))
    view.index.stored(BlockStored((901, 902, 903), None, tuple(new[:12]), BS))
    assert view.pending_blocks == 0 and view.at_risk_blocks() == 0
    assert [view.hit_tokens(_req(f"c{c}", toks)) for c, toks in enumerate(convs)] == [0, 16, 16]
    # A request behind one with the same prefix: its probe is past the first one's blocks.
    view.routed(_req("same", new))
    view.routed(_req("longer", _conv(9, 8)))
    assert view.pending_blocks == 1 + 3
