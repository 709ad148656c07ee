"""The metric-based family's math against hand computation: the contrastive loss, Matching
Networks' attention, Relation Networks' class maps, targets and MSE; prediction rules and the
refusal of bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import MatchingNetworks, RelationNetworks, Siamese
from lightning_meta.algorithms.matching import attention, class_log_probabilities
from lightning_meta.algorithms.relation import class_feature_maps, relation_targets
from lightning_meta.algorithms.siamese import best_match_per_class, contrastive_loss
from lightning_meta.models import Conv4
from lightning_meta.task import Task


class Identity(nn.Module):
    """A backbone that passes flat inputs through, so embeddings are chosen by hand."""

    embedding_size = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_contrastive_loss_equals_the_formula_on_a_hand_computed_example():
    # Distances 0.5 (same), 3 (different, beyond margin 2), 1 (different, inside: (2-1)² = 1),
    # 2 (same: 4).
    d = torch.tensor([[0.5, 3.0], [1.0, 2.0]], dtype=torch.float64)
    same = torch.tensor([[True, False], [False, True]])
    m = 2.0
    unbalanced = (0.25 + 0.0 + 1.0 + 4.0) / 4
    balanced = ((0.25 + 4.0) / 2 + (0.0 + 1.0) / 2) / 2
    assert contrastive_loss(d**2, same, m, balance=False).item() == pytest.approx(unbalanced, rel=1e-12)
    assert contrastive_loss(d**2, same, m, balance=True).item() == pytest.approx(balanced, rel=1e-12)


def test_contrastive_loss_stays_finite_for_coincident_embeddings_of_different_classes():
    sq = torch.zeros(2, requires_grad=True, dtype=torch.float64)
    loss = contrastive_loss(sq, torch.tensor([False, True]), 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-5) and torch.isfinite(sq.grad).all()


def test_siamese_task_loss_and_predictions_by_hand():
    # Embeddings chosen by hand: support (0,0) class 0 and (3,0) class 1; queries (1,0) class 0
    # and (2.5,0) class 1. Distances: q0 -> 1, 2; q1 -> 2.5, 0.5.
    task = Task(
        support_x=torch.tensor([[0.0, 0.0], [3.0, 0.0]]),
        support_y=torch.tensor([0, 1]),
        query_x=torch.tensor([[1.0, 0.0], [2.5, 0.0]]),
        query_y=torch.tensor([0, 1]),
    )
    model = Siamese(Identity(), loss="contrastive", margin=2.0, balance_pairs=False)
    out = model.task_loss(task)
    # same pairs: 1², 0.5²; different pairs: max(0, 2-2)² = 0, max(0, 2-2.5)² = 0
    assert out.loss.item() == pytest.approx((1 + 0.25 + 0 + 0) / 4)
    torch.testing.assert_close(out.predictions, -torch.tensor([[1.0, 4.0], [6.25, 0.25]]))
    assert out.predictions.argmax(-1).tolist() == [0, 1]


def test_siamese_koch_loss_is_bce_on_the_weighted_l1_distance():
    model = Siamese(Identity(), loss="koch", balance_pairs=False).double()
    with torch.no_grad():
        model.distance_head.weight.copy_(torch.tensor([[-1.0, 0.5]]))
        model.distance_head.bias.fill_(0.25)
    task = Task(
        support_x=torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64),
        support_y=torch.tensor([0, 1]),
        query_x=torch.tensor([[1.0, 1.0]], dtype=torch.float64),
        query_y=torch.tensor([1]),
    )
    out = model.task_loss(task)
    # |q - s0| = (1, 0) -> -1 + 0.25 = -0.75 (different); |q - s1| = (1, 1) -> -0.5 + 0.25 = -0.25 (same)
    logits = torch.tensor([-0.75, -0.25], dtype=torch.float64)
    expected = (-math.log(1 - torch.sigmoid(logits[0]).item()) - math.log(torch.sigmoid(logits[1]).item())) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(out.predictions, logits.unsqueeze(0))


def test_best_match_per_class_takes_the_nearest_support_example_of_each_class():
    scores = torch.tensor([[-5.0, -1.0, -3.0, -0.5]])
    support_y = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(best_match_per_class(scores, support_y, 2), torch.tensor([[-1.0, -0.5]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin": 0.0}, r"model.init_args.margin=0.0 must be > 0"),
        ({"margin": -1.0}, r"margin=-1.0 must be > 0"),
        ({"loss": "triplet"}, r"model.init_args.loss='triplet' is not one of"),
    ],
)
def test_siamese_refuses_bad_arguments_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Siamese(Conv4(hidden_channels=8), **kwargs)


def test_siamese_koch_without_an_embedding_size_names_the_key():
    with pytest.raises(ValueError, match=r"model.init_args.embedding_dim"):
        Siamese(nn.Flatten(), loss="koch")


def test_matching_attention_sums_to_one_and_equals_the_hand_computation():
    query = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    support = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], dtype=torch.float64)
    a = attention(query, support)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, dtype=torch.float64))
    # cosines: q0 -> (1, 0, -1); q1 -> (1/√2, 1/√2, -1/√2)
    r = 1 / math.sqrt(2)
    for row, cosines in ((0, [1.0, 0.0, -1.0]), (1, [r, r, -r])):
        e = [math.exp(c) for c in cosines]
        torch.testing.assert_close(a[row], torch.tensor([v / sum(e) for v in e], dtype=torch.float64))
    # Predictions: attention-weighted one-hot labels; support classes 0, 1, 0.
    log_p = class_log_probabilities(a.log(), torch.tensor([0, 1, 0]), 2)
    expected = torch.stack([a[:, 0] + a[:, 2], a[:, 1]], dim=1)
    torch.testing.assert_close(log_p.exp(), expected)


def test_matching_loss_is_the_nll_of_the_attention_weighted_labels():
    task = Task(
        support_x=torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        support_y=torch.tensor([0, 1]),
        query_x=torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64),
        query_y=torch.tensor([1, 0]),
    )
    out = MatchingNetworks(Identity()).task_loss(task)
    r = 1 / math.sqrt(2)
    p_q0_class1 = math.exp(r) / (math.exp(r) + math.exp(r))
    p_q1_class0 = math.exp(1) / (math.exp(1) + math.exp(0))
    assert out.loss.item() == pytest.approx(-(math.log(p_q0_class1) + math.log(p_q1_class0)) / 2, rel=1e-12)


def test_matching_fce_changes_the_embeddings_and_checks_its_steps():
    torch.manual_seed(0)
    task = Task(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(3, 2), torch.tensor([0, 1, 1]))
    plain, fce = MatchingNetworks(Identity()), MatchingNetworks(Identity(), fce=True, fce_steps=3)
    assert not torch.allclose(plain.task_loss(task).predictions, fce.task_loss(task).predictions)
    assert sum(p.numel() for p in fce.parameters()) > 0 == sum(p.numel() for p in plain.parameters())
    with pytest.raises(ValueError, match=r"model.init_args.fce_steps=0"):
        MatchingNetworks(Identity(), fce=True, fce_steps=0)


def test_relation_class_maps_are_sums_and_targets_are_one_hot():
    maps = torch.arange(4 * 2 * 1 * 1, dtype=torch.float64).view(4, 2, 1, 1)
    labels = torch.tensor([1, 0, 1, 0])
    summed = class_feature_maps(maps, labels, 2)
    torch.testing.assert_close(summed[0], maps[1] + maps[3])
    torch.testing.assert_close(summed[1], maps[0] + maps[2])
    targets = relation_targets(torch.tensor([2, 0]), 3, torch.float64)
    torch.testing.assert_close(targets, torch.tensor([[0.0, 0, 1], [1, 0, 0]], dtype=torch.float64))


def test_relation_loss_is_the_mse_of_its_scores_against_one_hot_targets():
    torch.manual_seed(0)
    model = RelationNetworks(Conv4(hidden_channels=4, pooled_blocks=2, flatten=False), feature_channels=4).double()
    task = Task(
        torch.randn(6, 1, 28, 28, dtype=torch.float64),
        torch.tensor([0, 1, 2, 0, 1, 2]),
        torch.randn(4, 1, 28, 28, dtype=torch.float64),
        torch.tensor([2, 0, 1, 1]),
    )
    out = model.task_loss(task)
    scores = out.predictions
    assert scores.shape == (4, 3) and bool(((scores > 0) & (scores < 1)).all())
    by_hand = sum(
        (scores[q, c].item() - float(task.query_y[q].item() == c)) ** 2 for q in range(4) for c in range(3)
    ) / (4 * 3)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-12)
    # The score of (query q, class c) is the relation module on [sum of c's support maps, q's map].
    maps = model.backbone(torch.cat([task.support_x, task.query_x]))
    pair = torch.cat([maps[0] + maps[3], maps[6]]).unsqueeze(0)  # class 0, query 0
    # BatchNorm normalises over the whole batch of pairs, so score that pair inside the same batch.
    classes = class_feature_maps(maps[:6], task.support_y, 3)
    pairs = torch.stack([torch.cat([classes[c], maps[6 + q]]) for q in range(4) for c in range(3)])
    torch.testing.assert_close(pairs[0:1], pair)
    torch.testing.assert_close(model.relation(pairs).view(4, 3), scores)


def test_relation_refuses_flat_embeddings_and_tiny_maps_naming_the_fix():
    model = RelationNetworks(Conv4(hidden_channels=4), feature_channels=4)
    task = Task(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"flatten=False, pooled_blocks=2"):
        model.task_loss(task)
    with pytest.raises(ValueError, match=r"model.init_args.feature_size=1"):
        RelationNetworks(Conv4(), feature_size=1)


def test_conv4_feature_map_options_keep_the_default_unchanged():
    x = torch.randn(3, 1, 28, 28)
    torch.manual_seed(0)
    default = Conv4(hidden_channels=8)
    torch.manual_seed(0)
    maps = Conv4(hidden_channels=8, pooled_blocks=2, flatten=False)
    assert default(x).shape == (3, 8)
    assert maps(x).shape == (3, 8, 7, 7)
    assert default.state_dict().keys() == maps.state_dict().keys()
    with pytest.raises(ValueError, match=r"out_features=None"):
        Conv4(out_features=5, flatten=False)


def test_synthetic_splits_have_classes_of_their_own():
    """No class of one split is a class of another.

    Two splits' class means lie farther apart (18.9 at least) than the means of the two halves of
    one class's examples (10.4 at most). When the splits shared their classes, only the noise new,
    as this helper once drew them, they were 6.7 apart, and an evaluation score could not tell
    generalisation from memorisation.
    """
    from tests.helpers import SyntheticClassesDataModule

    data = torch.stack([split.data for split in SyntheticClassesDataModule().splits]).flatten(3)
    halves = torch.linalg.vector_norm(data[:, :, :4].mean(2) - data[:, :, 4:].mean(2), dim=-1)
    means = data.mean(2)  # [split, class, pixels]
    closest = min(torch.cdist(means[a], means[b]).min() for a in range(3) for b in range(a + 1, 3))
    assert closest > halves.max(), f"splits share a class: class means {closest:.1f} apart"


def test_metric_learners_learn_on_synthetic_classes():
    """30 steps on the training classes lower the loss on the (unseen) validation classes by a
    tenth and leave accuracy there well above chance (1/3).

    Measured (torch 2.13 CPU), loss / accuracy before -> after on the validation classes:
    siamese 1.61 -> 0.08 / 0.73 -> 1.00, siamese-koch 0.71 -> 0.58 / 0.44 -> 0.79,
    matching 1.03 -> 0.83 / 0.67 -> 1.00, relation 0.27 -> 0.10 / 0.35 -> 1.00. Adam's rate is
    3e-3: at 1e-3 Koch's and Matching's losses fell by only 14% and 12% in 30 steps.
    """
    from tests.helpers import SyntheticClassesDataModule

    builders = {
        "siamese": lambda: Siamese(Conv4(hidden_channels=8)),
        "siamese-koch": lambda: Siamese(Conv4(hidden_channels=8), loss="koch"),
        "matching": lambda: MatchingNetworks(Conv4(hidden_channels=8)),
        "relation": lambda: RelationNetworks(
            Conv4(hidden_channels=8, pooled_blocks=2, flatten=False), feature_channels=8
        ),
    }
    dm = SyntheticClassesDataModule(shots=1, query_shots=4, tasks_per_batch=4, val_tasks=20)
    val = next(iter(dm.val_dataloader()))
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        with torch.no_grad():
            before, _ = model.meta_loss(val)
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        for batch in [b for _ in range(3) for b in dm.train_dataloader()]:  # 3 × 10 steps
            optimizer.zero_grad()
            model.meta_loss(batch)[0].backward()
            optimizer.step()
        with torch.no_grad():
            after, stats = model.meta_loss(val)
        assert after < 0.9 * before, f"{name}: validation loss {before:.3f} -> {after:.3f}"
        assert stats["acc"].mean() > 0.5, f"{name}: accuracy {stats['acc'].mean():.2f}"
