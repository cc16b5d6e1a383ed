from tandem.blockcache import BlockCache
from tandem.prefix import chain_hashes, text_block_hashes, token_block_hashes, tokenize


def test_lru_evicts_least_recently_used_first() -> None:
    cache = BlockCache(capacity_tokens=30)
    cache.insert([1, 2, 3], [10, 10, 10])
    assert cache.match_prefix([1]) == (1, 10)  # touch block 1: block 2 is now the oldest
    cache.insert([4], [10])
    assert 2 not in cache and all(h in cache for h in (1, 3, 4))
    assert cache.tokens == 30


def test_prefix_match_stops_at_first_gap() -> None:
    cache = BlockCache(100)
    cache.insert([1, 2], [16, 16])
    assert cache.peek_prefix([1, 2, 3]) == (2, 32)
    assert cache.peek_prefix([9, 1, 2]) == (0, 0)


def test_shrink_frees_down_to_limit() -> None:
    cache = BlockCache(100)
    cache.insert([1, 2, 3, 4], [25, 25, 25, 25])
    assert cache.shrink(40) == 75
    assert cache.tokens == 25 and 4 in cache


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
