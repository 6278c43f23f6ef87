"""The default model is the tutorial's network, to its state_dict keys."""

from __future__ import annotations

import torch

from fashion_sweep.core.model import NeuralNetwork

TUTORIAL_SHAPES = {
    "linear_relu_stack.0.weight": (512, 784),
    "linear_relu_stack.0.bias": (512,),
    "linear_relu_stack.2.weight": (512, 512),
    "linear_relu_stack.2.bias": (512,),
    "linear_relu_stack.4.weight": (10, 512),
    "linear_relu_stack.4.bias": (10,),
}


def test_default_is_784_512_512_10_with_tutorial_keys():
    shapes = {k: tuple(v.shape) for k, v in NeuralNetwork().state_dict().items()}
    assert shapes == TUTORIAL_SHAPES


def test_width_and_depth():
    model = NeuralNetwork(width=64, depth=3)
    linears = [m for m in model.linear_relu_stack if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 64),
        (64, 64),
        (64, 64),
        (64, 10),
    ]
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert NeuralNetwork(depth=0)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
