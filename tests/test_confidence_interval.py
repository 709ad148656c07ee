"""The 95% confidence interval of evaluation: the Student-t quantile with n − 1 degrees of
freedom, not the normal 1.96 (too narrow by 7% at Lake's 20 runs)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.algorithms import mean_and_ci95
from lightning_meta.algorithms.base import student_t_quantile

# 0.975 quantiles of Student's t, from printed tables (to the digits printed there).
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 19: 2.0930, 29: 2.0452, 99: 1.9842, 599: 1.9639, 1000: 1.9623}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_tables(df):
    assert student_t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-4)


def test_t_quantile_at_other_levels_and_its_limit():
    assert student_t_quantile(0.995, 1) == pytest.approx(63.6567, abs=1e-4)
    assert student_t_quantile(0.9, 3) == pytest.approx(1.6377, abs=1e-4)
    # Beyond 1000 degrees of freedom an expansion takes over: continuous there, and the normal's 1.96 in the limit.
    assert student_t_quantile(0.975, 1001) == pytest.approx(student_t_quantile(0.975, 1000), abs=1e-5)
    assert student_t_quantile(0.975, 1000) > student_t_quantile(0.975, 1001) > 1.959964
    assert student_t_quantile(0.975, 10**7) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="df=0"):
        student_t_quantile(0.975, 0)


@pytest.mark.parametrize("n", [2, 5, 20, 600])
def test_ci95_is_the_t_quantile_times_the_standard_error(n):
    values = torch.linspace(0, 1, n, dtype=torch.float64) ** 2
    mean, ci = mean_and_ci95(values)
    standard_error = values.std(unbiased=True) / math.sqrt(n)
    torch.testing.assert_close(mean, values.mean())
    torch.testing.assert_close(ci, student_t_quantile(0.975, n - 1) * standard_error)
    if n == 20:  # Lake's runs: 2.093 standard errors, 6.8% wider than the normal interval
        assert ci / standard_error == pytest.approx(2.0930, abs=1e-4)


def test_ci95_of_one_value_is_zero():
    mean, ci = mean_and_ci95(torch.tensor([0.25]))
    assert mean.item() == 0.25 and ci.item() == 0.0
