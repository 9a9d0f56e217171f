import pytest

from vlmdrop.ops.budget import largest_remainder, resolve_budget, validate_budget


@pytest.mark.parametrize("budget,n,expected", [(0.2, 576, 115), (0.5, 7, 4), (0.25, 10, 2), (1.0, 33, 33),
                                               (64, 576, 64), (700, 576, 576), (1e-6, 50, 1), (1, 9, 1)])
def test_resolve_budget(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, 0, -3, True, "0.2", None, float("nan")])
def test_validate_budget_rejects(bad):
    with pytest.raises(ValueError, match="budget"):
        validate_budget(bad)


def test_largest_remainder_exact_and_rounded():
    assert largest_remainder([1, 1, 1], 10, [10, 10, 10]) == [4, 3, 3]
    assert largest_remainder([0.5, 0.3, 0.2], 7, [10, 10, 10]) == [4, 2, 1]  # 3.5, 2.1, 1.4
    assert largest_remainder([2, 1], 0, [5, 5]) == [0, 0]


def test_largest_remainder_caps_redistribute():
    # ideal [8, 1, 1] but the first cap is 4: the other two share the rest equally
    assert largest_remainder([0.8, 0.1, 0.1], 10, [4, 10, 10]) == [4, 3, 3]
    # total above capacity: everything is full
    assert largest_remainder([1, 1], 50, [3, 4]) == [3, 4]
    # zero weights get units only after positive ones are full
    assert largest_remainder([1, 0, 0], 6, [2, 4, 4]) == [2, 2, 2]


def test_largest_remainder_sums_exactly_over_grid():
    import random

    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(1, 6)
        w = [rng.random() * rng.choice([0, 1, 1, 5]) for _ in range(k)]
        caps = [rng.randint(0, 30) for _ in range(k)]
        total = rng.randint(0, 120)
        s = largest_remainder(w, total, caps)
        assert sum(s) == min(total, sum(caps))
        assert all(0 <= a <= c for a, c in zip(s, caps))


def test_largest_remainder_errors():
    with pytest.raises(ValueError, match="caps"):
        largest_remainder([1, 2], 3, [1])
    with pytest.raises(ValueError, match="weights"):
        largest_remainder([-1, 2], 3, [5, 5])
