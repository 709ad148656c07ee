"""Backbones: shapes, options and their refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.models import Conv4


@pytest.mark.parametrize("size", [28, 84])
def test_strided_conv4_averages_the_last_map_into_hidden_channels_features(size):
    net = Conv4(hidden_channels=8, downsample="stride")
    x = torch.randn(3, 1, size, size)
    assert net(x).shape == (3, 8) and net.embedding_size == 8
    # Four stride-2 convolutions, no max-pool: 28 -> 14 -> 7 -> 4 -> 2.
    strides = [m.stride for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 4
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    last_map = net.features[:4](x)
    torch.testing.assert_close(net(x), last_map.mean(dim=(2, 3)))


def test_strided_conv4_head_takes_the_averaged_features():
    net = Conv4(hidden_channels=8, out_features=5, downsample="stride", feature_size=5)  # feature_size ignored
    assert net(torch.randn(2, 1, 84, 84)).shape == (2, 5)
    assert net.head.in_features == 8


def test_max_pool_conv4_is_unchanged_by_default():
    net = Conv4(hidden_channels=8, out_features=5)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 4
    assert net.head.in_features == 8 and net(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_zero_head_init_gives_zero_logits_and_default_does_not():
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(Conv4(hidden_channels=8, out_features=5, head_init="zeros")(x), torch.zeros(4, 5))
    assert Conv4(hidden_channels=8, out_features=5)(x).abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"downsample": "avg"}, "downsample='avg' is not one of"),
        ({"head_init": "normal"}, "head_init='normal' is not one of"),
        ({"norm": "layer"}, "norm='layer' is not one of"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv4(**kwargs)
