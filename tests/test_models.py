"""Backbones: shapes, options and their refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.models import Conv4, DropBlock, ResNet12


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


@pytest.mark.parametrize("size, side", [(28, 1), (84, 5)])
def test_max_pool_conv4_sizes_its_head_from_the_image_size(size, side):
    net = Conv4(hidden_channels=8, out_features=5, image_size=size)
    assert net.head.in_features == 8 * side * side == net.embedding_size
    assert net(torch.randn(2, 1, size, size)).shape == (2, 5)
    embedding = Conv4(hidden_channels=8, image_size=size)
    assert embedding(torch.randn(2, 1, size, size)).shape == (2, embedding.embedding_size)


def test_a_conv4_built_for_another_image_size_names_the_size_to_set():
    with pytest.raises(ValueError, match=r"built for 28×28 inputs .* got \(84, 84\).* image_size to 84"):
        Conv4(hidden_channels=8, out_features=5)(torch.randn(2, 1, 84, 84))
    # The hand-set feature_size of older configs still decides.
    assert Conv4(hidden_channels=8, out_features=5, feature_size=5).head.in_features == 8 * 25
    with pytest.raises(ValueError, match="image_size=8 is too small for 4 max-pooled blocks"):
        Conv4(image_size=8)


def resnet(**kwargs) -> ResNet12:
    return ResNet12(**{"channels": (4, 6, 8, 10), **kwargs})


def test_resnet12_has_the_metaoptnet_layout_at_full_width():
    net = ResNet12()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # Three 3×3 convolutions and a 1×1 shortcut per block, none with a bias.
    assert [c.out_channels for c in convs] == [w for w in (64, 160, 320, 640) for _ in range(4)]
    assert [c.kernel_size for c in convs[:4]] == [(3, 3)] * 3 + [(1, 1)]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 4
    assert net.embedding_size == 640
    assert ResNet12(pool="flatten").embedding_size == 640 * 25  # MetaOptNet's 16,000 features at 84×84


@pytest.mark.parametrize("pool, features", [("avg", 10), ("flatten", 10 * 25)])
def test_resnet12_output_shapes(pool, features):
    x = torch.randn(2, 3, 84, 84)
    assert resnet(pool=pool)(x).shape == (2, features)
    assert resnet(pool=pool, out_features=5)(x).shape == (2, 5)
    assert torch.equal(resnet(out_features=5, head_init="zeros")(x), torch.zeros(2, 5))


def test_resnet12_refuses_bad_options_and_inputs_by_name():
    for kwargs, match in [
        ({"norm": "layer"}, "norm='layer' is not one of"),
        ({"pool": "max"}, "pool='max' is not one of"),
        ({"channels": (4, 6, 8)}, r"channels=\[4, 6, 8\] must be four positive widths"),
        ({"pool": "flatten", "image_size": 8}, "image_size=8 vanishes"),
        ({"drop_rate": 1.0}, r"drop_rate=1.0 must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            resnet(**kwargs)
    with pytest.raises(ValueError, match=r"built for 84×84 inputs .* image_size to 28"):
        resnet(pool="flatten")(torch.randn(2, 3, 28, 28))


def test_dropblock_drops_whole_squares_at_the_rate_and_is_off_in_eval():
    drop = DropBlock(drop_rate=0.2, block_size=3)
    x = torch.ones(64, 8, 11, 11)
    torch.manual_seed(0)
    out = drop(x)
    zero = (out == 0).float()
    # Every dropped position lies in an all-dropped 3×3 square: the mask is a union of blocks
    # (its morphological opening is itself).
    eroded = -torch.nn.functional.max_pool2d(-zero, 3, stride=1)
    opened = torch.nn.functional.max_pool2d(torch.nn.functional.pad(eroded, (2, 2, 2, 2)), 3, stride=1)
    assert torch.equal(opened, zero)
    assert 0.15 < zero.mean() < 0.25  # the rate, in expectation
    torch.testing.assert_close(out.mean(), x.mean())  # rescaled by the share kept
    torch.manual_seed(0)
    assert torch.equal(drop(x), out)  # seeded by torch's generator
    drop.eval()
    assert torch.equal(drop(x), x)
