import math

import pytest

from lussray.optim.schedules import cosine_schedule


@pytest.mark.parametrize("warmup", [0, 10])
def test_endpoints_and_monotone_decay(warmup):
    kwargs = dict(total_steps=100, base_value=0.6, final_value=0.0006, warmup_steps=warmup)
    assert cosine_schedule(warmup, **kwargs) == pytest.approx(0.6)
    assert cosine_schedule(100, **kwargs) == pytest.approx(0.0006)
    assert cosine_schedule(10_000, **kwargs) == pytest.approx(0.0006)
    values = [cosine_schedule(s, **kwargs) for s in range(warmup, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_matches_the_reference_per_iteration_array():
    total = 50
    reference = [0.0006 + 0.5 * (0.6 - 0.0006) * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    ours = [cosine_schedule(s, total_steps=total, base_value=0.6, final_value=0.0006) for s in range(total)]
    assert ours == pytest.approx(reference)


def test_linear_warmup():
    kwargs = dict(total_steps=100, base_value=1.0, final_value=0.0, warmup_steps=4, warmup_start_value=0.2)
    assert [cosine_schedule(s, **kwargs) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


@pytest.mark.parametrize("step,total,warmup", [(-1, 10, 0), (0, 10, 10), (0, 10, -1)])
def test_bad_arguments(step, total, warmup):
    with pytest.raises(ValueError):
        cosine_schedule(step, total_steps=total, base_value=1.0, final_value=0.0, warmup_steps=warmup)
