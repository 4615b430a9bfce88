import re

import pytest
import torch
from torch import nn

from reslab.d2l import Residual, load_fashion_mnist_dataset, resnet_block
from reslab.models import ResidualUnit, count_params


def test_residual_matches_the_notebook():
    blk = Residual(3, 3)
    x = torch.rand(4, 3, 6, 6)
    assert blk(x).shape == (4, 3, 6, 6)
    blk = Residual(3, 6, use_1x1conv=True, strides=2)
    assert blk(x).shape == (4, 6, 3, 3)
    blk = Residual(3, 3, use_1x1conv=True, strides=2)
    assert blk(x).shape == (4, 3, 3, 3)
    # built on the library's unit, with the notebook's biased 1x1 conv on the shortcut
    assert isinstance(blk, ResidualUnit)
    assert isinstance(blk.shortcut, nn.Conv2d) and blk.shortcut.bias is not None
    assert isinstance(Residual(3, 3, use_1x1conv=True).shortcut, nn.Conv2d)


def test_notebook_cells_build_its_resnet18():
    # the notebook's own cells, verbatim
    b1 = nn.Sequential(
        nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    net = nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, 10))
    X = torch.rand(size=(1, 1, 224, 224))
    shapes = []
    for layer in net:
        X = layer(X)
        shapes.append(tuple(X.shape))
    assert shapes[-1] == (1, 10) and shapes[4] == (1, 512, 7, 7)
    assert count_params(net) == 11_178_378


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0,), "batch_size must be a positive integer, got 0"),
        ((-5,), "batch_size must be a positive integer, got -5"),
        ((256, -3), "resize must be a positive integer or None, got -3"),
        ((256, 2.5), "resize must be a positive integer or None, got 2.5"),
        ((True,), "batch_size must be a positive integer, got True"),
    ],
)
def test_notebook_loader_names_a_bad_argument(args, message):
    """A learner's slip gets the argument's name, not a ZeroDivisionError or torch's resize error."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_fashion_mnist_dataset(*args)


def test_notebook_loader_refuses_a_batch_larger_than_the_training_set(tiny_data):
    # every step takes a full batch: a batch above the 512 images left no step, and train_3ch divided by zero
    with pytest.raises(ValueError, match="^batch_size 513 exceeds the 512 training images$"):
        load_fashion_mnist_dataset(513, root=str(tiny_data))
    train_iter, _ = load_fashion_mnist_dataset(512, root=str(tiny_data))
    assert len(train_iter) == 1 and len(train_iter.dataset) == 512
