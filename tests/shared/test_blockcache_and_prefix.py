from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.blockcache import BlockCache
from tandem.prefix import chain_hashes, text_block_hashes, token_block_hashes, tokenize


def test_lru_evicts_chain_tails_before_shared_heads() -> None:
    cache = BlockCache(capacity_tokens=40)
    a = chain_hashes([0, 1, 2])
    b = chain_hashes([0, 1, 7])  # shares a's first two blocks
    cache.insert(a, [10, 10, 10])
    cache.insert(b, [10, 10, 10])  # 40 tokens: full
    assert cache.match_prefix(a) == (3, 30)  # a is now the most recent chain
    cache.insert(chain_hashes([5]), [10])
    assert b[2] not in cache and all(h in cache for h in a)  # b's tail went, not the shared head
    cache.insert(chain_hashes([6]), [10])
    assert a[2] not in cache and a[:2] == [h for h in a if h in cache]  # the tail of a, never its head
    assert cache.tokens == 40


def test_prefix_match_stops_at_first_gap() -> None:
    cache = BlockCache(100)
    cache.insert([1, 2], [16, 16])
    assert cache.peek_prefix([1, 2, 3]) == (2, 32)
    assert cache.peek_prefix([9, 1, 2]) == (0, 0)
    assert cache.prefix_blocks([1, 2, 3]) == 2 and cache.prefix_blocks([9, 1, 2]) == 0


def test_shrink_frees_tails_down_to_limit() -> None:
    cache = BlockCache(100)
    cache.insert([1, 2, 3, 4], [25, 25, 25, 25])
    assert cache.shrink(40) == 75
    assert cache.tokens == 25 and 1 in cache


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=40),
       st.integers(16, 200))
def test_cached_blocks_of_any_chain_form_a_prefix(prompts: list[list[int]], capacity: int) -> None:
    """The invariant prefix_blocks' bisection relies on, under inserts, touches and evictions."""
    cache = BlockCache(capacity)
    chains = [chain_hashes(p) for p in prompts]
    for i, chain in enumerate(chains):
        if i % 3 == 2:
            cache.match_prefix(chains[i // 2])
        cache.insert(chain, [8] * len(chain))
        for c in chains[:i + 1]:
            linear = next((k for k, h in enumerate(c) if h not in cache), len(c))
            assert all(h not in cache for h in c[linear:])
            assert cache.prefix_blocks(c) == linear == cache.peek_prefix(c)[0]


def test_chained_hashes_identify_whole_prefixes() -> None:
    a = chain_hashes([0, 1, 2])
    b = chain_hashes([0, 1, 5])
    c = chain_hashes([9, 1, 2])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert not set(a) & set(c)  # same block id after a different prefix is a different block


def test_text_blocks_only_hash_full_blocks_and_are_stable() -> None:
    tokens = tokenize("Hello, world! " * 21)  # 4 pieces each: Hello , world !
    assert len(tokens) == 84
    assert len(token_block_hashes(tokens, 16)) == 5  # the 4-token tail is not a full block
    n, hashes = text_block_hashes("Hello, world! " * 21, 16)
    assert n == 84 and hashes == token_block_hashes(tokens, 16)


def test_long_texts_are_tokenized_in_windows_to_the_same_pieces() -> None:
    """tokenize() cuts long texts at whitespace (so a thread gives the event loop its turns); the pieces
    are exactly those of one regex pass, whatever falls on a window's edge."""
    import random
    import re

    from tandem.prefix import tokenize

    one_pass = re.compile(r"\w+|[^\w\s]")
    rng = random.Random(7)
    pieces = ["hello", "world!", "a,b", "  ", "\n", "x" * 40_000, "é-ü", "...", "\t", "日本語"]
    for _ in range(10):
        text = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 20_000)))
        assert tokenize(text) == one_pass.findall(text)
