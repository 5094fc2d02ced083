"""Load metrics (docs/method.md §4): Gini and friends, by value."""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

from talklora_min.probes import (coefficient_of_variation, dead_experts, gini, hard_load, load_entropy,
                                 load_metrics, max_mean_share, soft_load, top1_churn)




loads = st.lists(st.floats(0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=12).filter(
    lambda v: sum(v) > 0)


def gini_double_sum(v):
    v = np.asarray(v, dtype=np.float64)
    return np.abs(v[:, None] - v[None, :]).sum() / (2 * len(v) * v.sum())


@given(st.integers(1, 16), st.floats(1e-6, 1e6))
def test_gini_equal_load_is_zero(n, value):
    assert gini([value] * n) == pytest.approx(0.0, abs=1e-12)
    assert gini([value] * n, normalized=True) == pytest.approx(0.0, abs=1e-12)


@given(st.integers(2, 16), st.data())
def test_gini_one_hot(n, data):
    k = data.draw(st.integers(0, n - 1))
    load = [0.0] * n
    load[k] = data.draw(st.floats(1e-3, 1e6))
    assert gini(load) == pytest.approx(1 - 1 / n, rel=1e-12)
    assert gini(load, normalized=True) == pytest.approx(1.0, rel=1e-12)


def test_gini_one_hot_four_experts_is_three_quarters_and_single_expert_zero():
    assert gini([0, 0, 5, 0]) == pytest.approx(0.75)
    assert gini([3.0]) == 0.0 and gini([3.0], normalized=True) == 0.0


@given(loads)
def test_gini_matches_double_sum_definition_and_range(v):
    g = gini(v)
    assert g == pytest.approx(gini_double_sum(v), rel=1e-9, abs=1e-12)
    assert 0.0 <= g <= 1 - 1 / len(v) + 1e-15


@given(loads, st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_gini_permutation_and_scaling_invariance(v, rnd, c):
    perm = list(v)
    rnd.shuffle(perm)
    assert gini(perm) == pytest.approx(gini(v), rel=1e-12, abs=1e-15)
    assert gini([c * x for x in v]) == pytest.approx(gini(v), rel=1e-9, abs=1e-12)


@given(st.lists(st.floats(0.0, 100.0), min_size=2, max_size=10), st.data())
def test_pigou_dalton_transfer_to_richer_increases_gini(v, data):
    i, j = data.draw(st.lists(st.integers(0, len(v) - 1), min_size=2, max_size=2, unique=True))
    if v[i] > v[j]:
        i, j = j, i                                   # i poorer (or equal), j richer
    assume(v[i] >= 1e-3)                              # something to transfer
    t = data.draw(st.floats(1e-3 * v[i], v[i]))
    after = list(v)
    after[i] -= t
    after[j] += t
    assert gini(after) > gini(v)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"), ([1.0, -0.5], "non-negative"), ([1.0, float("nan")], "NaN or Inf"),
    ([1.0, float("inf")], "NaN or Inf"), ([0.0, 0.0], "all zero"), ([[1.0, 2.0]], "1-dimensional"),
    ("abc", "tensor, numpy array or list"), (None, "tensor, numpy array or list"),
    (["a", "b"], "tensor, numpy array or list"), (torch.ones(3, dtype=torch.complex64), "complex64"),
])
def test_load_validation_errors_name_argument_and_problem(bad, message):
    error = ValueError if isinstance(bad, list) and all(isinstance(v, (float, list)) for v in bad) else TypeError
    for fn in (gini, load_entropy, coefficient_of_variation, max_mean_share, dead_experts, load_metrics):
        with pytest.raises(error, match=message) as err:
            fn(bad)
        assert "load" in str(err.value)


def test_accepts_tensor_numpy_list_identically():
    v = [1.0, 2.0, 3.0, 10.0]
    assert gini(v) == gini(np.array(v)) == gini(torch.tensor(v, dtype=torch.float64)) == pytest.approx(
        gini_double_sum(v))
    assert gini(torch.tensor(v, dtype=torch.float32)) == pytest.approx(gini_double_sum(v), rel=1e-7)


def test_other_metrics_by_value():
    assert load_entropy([1, 1, 1, 1]) == pytest.approx(1.0)
    assert load_entropy([0, 7, 0, 0]) == pytest.approx(0.0, abs=1e-15)
    assert load_entropy([1, 3]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2))
    assert coefficient_of_variation([1, 3]) == pytest.approx(0.5)
    assert coefficient_of_variation([2, 2, 2]) == 0.0
    assert max_mean_share([1, 3]) == pytest.approx(1.5)
    assert max_mean_share([5, 0, 0, 0]) == pytest.approx(4.0)
    assert dead_experts([1.0, 0.0, 1.0, 1e-5]) == [1, 3]      # share < 1e-3 / 4
    assert dead_experts([1.0, 1.0, 1.0, 1e-3]) == []
    m = load_metrics([0, 0, 4, 0])
    assert m == {"n_experts": 4, "total": 4.0, "gini": 0.75, "gini_normalized": 1.0, "entropy": 0.0,
                 "cv": pytest.approx(math.sqrt(3)), "max_mean_share": 4.0, "n_dead_experts": 3}


def test_soft_hard_load_and_churn():
    g = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    assert torch.allclose(soft_load(g), torch.tensor([1.5, 1.4, 1.1], dtype=torch.float64))
    assert hard_load(g).tolist() == [2.0, 1.0, 1.0]
    assert hard_load(g.reshape(2, 2, 3)).tolist() == [2.0, 1.0, 1.0]      # leading axes are tokens
    h = g.clone()
    h[0] = torch.tensor([0.1, 0.8, 0.1])
    assert top1_churn(g, h) == 0.25 and top1_churn(g, g) == 0.0
    with pytest.raises(ValueError, match="gates_a and gates_b"):
        top1_churn(g, g[:2])
    with pytest.raises(ValueError, match="gates must be non-negative"):
        soft_load(-g)


@pytest.mark.parametrize("scale", [1e-320, 1e-200, 1e200, 1e307])
def test_metrics_near_the_ends_of_the_float_range_equal_the_unit_scale_values(scale):
    """Scale invariance must survive float64's range: no NaN/Inf from overflowing sums or squares."""
    v = [1.0, 3.0, 0.5, 0.0]
    big = [scale * x for x in v]
    for fn in (gini, load_entropy, coefficient_of_variation, max_mean_share):
        assert fn(big) == pytest.approx(fn(v), rel=1e-12), fn.__name__
    assert gini(big, normalized=True) == pytest.approx(gini(v, normalized=True), rel=1e-12)
    assert dead_experts(big) == dead_experts(v) == [3]
    if scale < 1e300:
        assert load_metrics(big)["total"] == pytest.approx(4.5 * scale, rel=1e-12)


def test_overflowing_totals_raise_instead_of_inf():
    with pytest.raises(ValueError, match="total overflows float64"):
        load_metrics([1.7e308, 1.7e308])
    assert gini([1.7e308, 1.7e308]) == 0.0                       # the scale-free metrics still work
    with pytest.raises(ValueError, match="overflows float64"):
        soft_load(torch.full((3, 2), 1e308, dtype=torch.float64))


def test_numpy_numbers_and_argument_types():
    assert dead_experts([1.0, 1e-5, 1.0], threshold=np.float32(0.01)) == [1]
    assert gini(np.array([1, 3], dtype=np.int64), normalized=np.bool_(True)) == pytest.approx(0.5)
    with pytest.raises(TypeError, match="normalized must be a bool"):
        gini([1.0, 2.0], normalized="yes")
    with pytest.raises(TypeError, match="threshold must be a number"):
        dead_experts([1.0, 2.0], threshold=None)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        dead_experts([1.0, 2.0], threshold=float("nan"))
    with pytest.raises(TypeError, match="gates_a must be"):
        top1_churn(None, [[1.0, 0.0]])
