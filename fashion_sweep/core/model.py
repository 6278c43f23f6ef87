"""The Quickstart MLP, with its width and depth taken from config."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class NeuralNetwork(nn.Module):
    """width=512, depth=2 is the tutorial's 784-512-512-10, with the same state_dict keys."""

    def __init__(self, width: int = 512, depth: int = 2, in_features: int = 28 * 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        layers.append(nn.Linear(width if depth else in_features, len(CLASSES)))
        self.linear_relu_stack = nn.Sequential(*layers)

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def classify(model: nn.Module, dataset: Dataset, index: int) -> tuple[str, str]:
    """The class the model picks for dataset[index], and the true one: the tutorial's
    `Predicted: "...", Actual: "..."`."""
    device = next(model.parameters()).device
    model.eval()
    x, y = dataset[index][0], dataset[index][1]
    with torch.no_grad():
        pred = model(x.to(device))
    return CLASSES[pred[0].argmax(0)], CLASSES[y]
