from lussray.eval.parallel import default_workers, ordered_map


def _square(x: int) -> int:
    return x * x


def _numbers(seen: list, count: int):
    for i in range(count):
        seen.append(i)
        yield i


def test_inline_map_keeps_order():
    assert list(ordered_map(_square, range(5))) == [0, 1, 4, 9, 16]
    assert default_workers() >= 1


def test_pool_keeps_order_and_reads_input_lazily():
    seen: list = []
    results = ordered_map(_square, _numbers(seen, 23), workers=2, chunk_size=2, max_pending=2)
    assert next(results) == 0
    assert len(seen) <= 2 * 2 + 2  # at most max_pending chunks (plus the one being cut) were pulled
    assert list(results) == [i * i for i in range(1, 23)]
