"""Candidate inner losses: each against a hand computation in float64, their limits, and the
robustness that makes them candidates."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_meta.losses import (
    CANDIDATES,
    CandidateLoss,
    MixtureLoss,
    cauchy,
    consistency_filtered_cross_entropy,
    consistency_weights,
    cross_entropy,
    focal,
    generalised_cross_entropy,
    huber,
    l1,
    label_smoothed_cross_entropy,
    log_cosh,
    mse,
    mse_one_hot,
)
from lightning_meta.losses.candidates import candidate_fn, known_candidates

g = torch.Generator().manual_seed(0)
LOGITS = torch.randn(6, 4, generator=g, dtype=torch.float64)
LABELS = torch.tensor([0, 3, 1, 2, 2, 0])
PRED = torch.randn(7, 1, generator=g, dtype=torch.float64)
TARGET = torch.randn(7, 1, generator=g, dtype=torch.float64)


def probs_true() -> list[float]:
    out = []
    for row, label in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        exps = [math.exp(v) for v in row]
        out.append(exps[label] / sum(exps))
    return out


def test_classification_losses_against_hand_computations():
    p = probs_true()
    n = len(p)
    assert cross_entropy(LOGITS, LABELS).item() == pytest.approx(sum(-math.log(v) for v in p) / n, rel=1e-12)
    assert focal(LOGITS, LABELS, gamma=2.0).item() == pytest.approx(
        sum(-((1 - v) ** 2) * math.log(v) for v in p) / n, rel=1e-12
    )
    assert generalised_cross_entropy(LOGITS, LABELS, q=0.7).item() == pytest.approx(
        sum((1 - v**0.7) / 0.7 for v in p) / n, rel=1e-12
    )
    # Label smoothing: cross-entropy against (1 - ε)·one-hot + ε/C.
    eps, classes = 0.1, LOGITS.shape[1]
    smoothed = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        for c, v in enumerate(row):
            target = (1 - eps) * (c == label) + eps / classes
            smoothed -= target * (v - log_z)
    assert label_smoothed_cross_entropy(LOGITS, LABELS, 0.1).item() == pytest.approx(smoothed / n, rel=1e-12)
    probs = torch.softmax(LOGITS, -1).tolist()
    by_hand = sum(
        sum((q - (c == y)) ** 2 for c, q in enumerate(row)) for row, y in zip(probs, LABELS.tolist(), strict=True)
    )
    assert mse_one_hot(LOGITS, LABELS).item() == pytest.approx(by_hand / n, rel=1e-12)


def test_classification_limits_reduce_to_cross_entropy_or_mae():
    ce = cross_entropy(LOGITS, LABELS)
    torch.testing.assert_close(focal(LOGITS, LABELS, gamma=0.0), ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(label_smoothed_cross_entropy(LOGITS, LABELS, 0.0), ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(generalised_cross_entropy(LOGITS, LABELS, q=1e-7), ce, rtol=1e-5, atol=0)
    mae = sum(1 - v for v in probs_true()) / len(LABELS)
    assert generalised_cross_entropy(LOGITS, LABELS, q=1.0).item() == pytest.approx(mae, rel=1e-12)
    with pytest.raises(ValueError, match="q=0 must be in"):
        generalised_cross_entropy(LOGITS, LABELS, q=0)


def test_regression_losses_against_hand_computations():
    d = (PRED - TARGET).flatten().tolist()
    n = len(d)
    assert mse(PRED, TARGET).item() == pytest.approx(sum(x * x for x in d) / n, rel=1e-12)
    assert l1(PRED, TARGET).item() == pytest.approx(sum(abs(x) for x in d) / n, rel=1e-12)
    hub = sum(x * x / 2 if abs(x) <= 1 else abs(x) - 0.5 for x in d) / n
    assert huber(PRED, TARGET).item() == pytest.approx(hub, rel=1e-12)
    assert log_cosh(PRED, TARGET).item() == pytest.approx(sum(math.log(math.cosh(x)) for x in d) / n, rel=1e-12)
    assert cauchy(PRED, TARGET, 2.0).item() == pytest.approx(
        sum(2.0 * math.log1p((x / 2) ** 2) for x in d) / n, rel=1e-12
    )
    # No overflow far out: log cosh(1000) = 1000 − log 2 to double precision.
    far = log_cosh(torch.tensor([1000.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert far.item() == pytest.approx(1000 - math.log(2), rel=1e-15)


@pytest.mark.parametrize("name", list(CANDIDATES["regression"]))
def test_an_outliers_pull_is_unbounded_only_for_mse(name):
    loss = CANDIDATES["regression"][name]

    def pull(residual: float) -> float:
        pred = torch.tensor([residual], dtype=torch.float64, requires_grad=True)
        loss(pred, torch.zeros(1, dtype=torch.float64)).backward()
        return pred.grad.abs().item()

    near, far = pull(10.0), pull(1000.0)
    if name == "mse":
        assert far == pytest.approx(100 * near)
    elif name == "cauchy":
        assert far < near < 0.2  # redescending: far outliers pull less
    else:
        assert far == pytest.approx(near, rel=1e-6) and far <= 1.0  # bounded pull


def test_every_candidate_is_minimal_at_the_target():
    for name, loss in CANDIDATES["regression"].items():
        at = loss(TARGET, TARGET)
        assert at.item() == pytest.approx(0.0, abs=1e-12), name
        assert loss(PRED, TARGET) > at, name
    confident = 30.0 * torch.nn.functional.one_hot(LABELS, 4).double()
    for name, loss in CANDIDATES["classification"].items():
        if name == "label_smoothed_cross_entropy":
            continue  # its minimum is not at one-hot
        assert loss(confident, LABELS) < loss(LOGITS, LABELS) and loss(confident, LABELS) < 1e-6, name


def _clusters(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Logits near 5·one-hot of each example's *true* class `labels` (well-separated clusters)."""
    noise = torch.randn(len(labels), classes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return 5.0 * torch.nn.functional.one_hot(labels, classes).double() + 0.3 * noise


def test_consistency_filtered_ce_is_cross_entropy_on_a_consistent_support_set():
    labels = torch.arange(3).repeat_interleave(4)
    logits = _clusters(labels)
    assert consistency_weights(logits, labels).tolist() == [1.0] * 12
    torch.testing.assert_close(
        consistency_filtered_cross_entropy(logits, labels), cross_entropy(logits, labels), rtol=1e-12, atol=0
    )


def test_consistency_filtered_ce_down_weights_a_flipped_label_and_fits_the_rest():
    true = torch.arange(3).repeat_interleave(4)
    labels = true.clone()
    labels[0] = 1  # an example of class 0 (it lies among class 0's) labelled 1
    logits = _clusters(true).requires_grad_()
    weights = consistency_weights(logits, labels)
    assert weights[0] < 1e-3 and weights[1:].tolist() == [1.0] * 11
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    loss = consistency_filtered_cross_entropy(logits, labels)
    # Σ w·CE / Σ w: the flipped example hardly counts, so the loss is ~the mean over the other 11.
    assert loss.item() == pytest.approx(per_example[1:].mean().item(), rel=1e-2)
    assert loss < cross_entropy(logits, labels)  # CE pays the flipped example's large loss
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and grad[1:].abs().sum() > 0
    # The weights are detached: the flipped example's logits get only its weight's share of CE's pull.
    assert grad[0].abs().max() < 1e-3 * grad[1:].abs().max()


def test_consistency_filtered_ce_with_one_example_per_class_is_cross_entropy_not_nan():
    labels = torch.arange(4)
    logits = LOGITS[:4].clone().requires_grad_()
    # No leave-one-out mean for any example's own class: every weight would be 0, so all are 1.
    assert consistency_weights(logits, labels).tolist() == [1.0] * 4
    loss = consistency_filtered_cross_entropy(logits, labels)
    torch.testing.assert_close(loss, cross_entropy(logits, labels), rtol=1e-12, atol=0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="temperature=0"):
        consistency_filtered_cross_entropy(LOGITS, LABELS, temperature=0)


def test_consistency_filtered_ce_is_a_named_candidate_outside_the_default_set():
    name = "consistency_filtered_cross_entropy"
    assert name not in CANDIDATES["classification"]  # default candidate sets (and their numbers) unchanged
    assert name in known_candidates("classification")
    task_logits = _clusters(torch.arange(3).repeat_interleave(2))
    labels = torch.arange(3).repeat_interleave(2)
    torch.testing.assert_close(
        candidate_fn("classification", name)(task_logits, labels, {}),
        consistency_filtered_cross_entropy(task_logits, labels),
    )
    assert CandidateLoss(name).kind == "classification"
    mixture = MixtureLoss(candidates=["cross_entropy", name], kind="classification")
    assert mixture.candidates == ["cross_entropy", name]


def test_consistency_filtered_ce_runs_under_vmap_as_in_a_loop():
    # The learners batch tasks with torch.func.vmap: no data-dependent op (e.g. F.one_hot) inside.
    labels = torch.arange(3).repeat_interleave(4).expand(2, 12).clone()
    labels[0, 0] = 1
    logits = torch.stack([_clusters(torch.arange(3).repeat_interleave(4)), LOGITS[:3].repeat(4, 1)[:, :3]])
    looped = torch.stack([consistency_filtered_cross_entropy(logits[i], labels[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(consistency_filtered_cross_entropy)(logits, labels), looped)
    grads = torch.func.vmap(torch.func.grad(consistency_filtered_cross_entropy))(logits, labels)
    torch.testing.assert_close(grads[0], torch.func.grad(consistency_filtered_cross_entropy)(logits[0], labels[0]))
