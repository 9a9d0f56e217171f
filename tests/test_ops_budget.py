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


def _globalcom2_twin(weights, total, caps):
    """Frozen copy of the former `ops.globalcom2._largest_remainder` (deleted, replaced by
    `largest_remainder(..., normalize_first=True)`): the reference GlobalCom2's numbers were made with."""
    import math

    k = [0] * len(weights)
    free = [i for i in range(len(weights)) if caps[i] > 0]
    left = total
    while left > 0 and free:
        wsum = sum(weights[i] for i in free)
        share = {i: (weights[i] / wsum if wsum > 0 else (caps[i] - k[i]) / sum(caps[j] - k[j] for j in free))
                 for i in free}
        quota = {i: left * share[i] for i in free}
        over = [i for i in free if k[i] + quota[i] >= caps[i]]
        if over:
            for i in over:
                left -= caps[i] - k[i]
                k[i] = caps[i]
            free = [i for i in free if i not in over]
            continue
        base = {i: math.floor(quota[i]) for i in free}
        rest = left - sum(base.values())
        order = sorted(free, key=lambda i: (-(quota[i] - base[i]), i))
        for i in free:
            k[i] += base[i]
        for i in order[:rest]:
            k[i] += 1
        left = 0
    return k


def _random_apportionments(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(1, 8)
        caps = [rng.choice([0, 1, 2, 3, 5, 8, 24, 144, 576]) for _ in range(k)]
        mode = rng.random()
        if mode < 0.3:  # many exact ties
            w = [float(rng.choice([0, 1, 2, 0.5])) for _ in range(k)]
        elif mode < 0.6:  # GlobalCom2's weights n_i * r_i
            w = [c * rng.choice([0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 1.0]) for c in caps]
        else:
            w = [rng.random() * rng.choice([1, 10, 1e-3]) for _ in range(k)]
        yield w, rng.randint(0, sum(caps)), caps


def test_largest_remainder_normalize_first_is_globalcom2s_rule():
    n_differ = 0
    for w, total, caps in _random_apportionments(20000):
        ref = _globalcom2_twin(w, total, caps)
        assert largest_remainder(w, total, caps, normalize_first=True) == ref, (w, total, caps)
        n_differ += largest_remainder(w, total, caps) != ref
    # the default order really differs (at floating-point ties), so the option is needed
    assert n_differ > 0
    assert largest_remainder([1.0, 0.2], 3, [5, 2]) == [2, 1]
    assert largest_remainder([1.0, 0.2], 3, [5, 2], normalize_first=True) == [3, 0]


def test_crop_keep_counts_exact_mode_matches_the_former_twin():
    import random

    from vlmdrop.ops.globalcom2 import crop_keep_counts

    rng = random.Random(1)
    for _ in range(3000):
        n = [rng.choice([0, 24, 144, 576]) for _ in range(rng.randint(1, 6))]
        r = [rng.choice([0.0, 0.1, 0.2, 0.25, 1 / 3, rng.random(), 1.0]) for _ in n]
        total = rng.randint(0, sum(n))
        assert crop_keep_counts(n, r, total=total) == _globalcom2_twin([a * b for a, b in zip(n, r)], total, n)
