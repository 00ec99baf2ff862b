import math

import pytest
import torch

from diffutron.errors import DiffutronError
from diffutron.schedules import SCHEDULES, get_schedule, sample_t


def test_linear_weight_is_one_over_t():
    t = torch.tensor([0.001, 0.1, 0.5, 0.9, 1.0])
    s = get_schedule("linear")
    assert torch.allclose(s.weight(t), 1.0 / t)
    assert torch.allclose(s.mask_prob(t), t)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_dalpha_matches_numeric_derivative(name):
    s = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(s.dalpha(t), numeric, atol=1e-6)
    w = s.weight(t)
    assert torch.allclose(w, -numeric / (1 - s.alpha(t)), atol=1e-5)
    assert (s.alpha(torch.tensor([0.0], dtype=torch.float64)) > 0.99).all()


def test_cosine_weight_closed_form():
    t = torch.tensor([0.3], dtype=torch.float64)
    expected = (math.pi / 2) * math.sin(math.pi * 0.3 / 2) / (1 - math.cos(math.pi * 0.3 / 2))
    assert get_schedule("cosine").weight(t).item() == pytest.approx(expected)


@pytest.mark.parametrize("method", ["iid", "antithetic", "stratified"])
def test_sample_t_range_and_determinism(method):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_t(64, method=method, generator=g1)
    b = sample_t(64, method=method, generator=g2)
    assert torch.equal(a, b)
    assert (a >= 1e-3).all() and (a < 1).all()


def test_stratified_covers_every_stratum_and_antithetic_pairs():
    t = sample_t(10, eps=0.0, method="stratified", generator=torch.Generator().manual_seed(0))
    assert sorted((t * 10).floor().long().tolist()) == list(range(10))
    a = sample_t(8, eps=0.0, method="antithetic", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a[:4] + a[4:], torch.ones(4), atol=1e-6)


def test_variance_reduction_of_stratified_mean():
    def spread(method):
        means = [sample_t(16, method=method, generator=torch.Generator().manual_seed(s)).mean() for s in range(200)]
        return torch.stack(means).std()

    assert spread("stratified") < 0.5 * spread("iid")


def test_unknown_schedule_error():
    with pytest.raises(DiffutronError, match="unknown noise schedule 'foo'"):
        get_schedule("foo")
    with pytest.raises(DiffutronError, match="unknown t sampling"):
        sample_t(3, method="bad")
