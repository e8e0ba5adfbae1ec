"""A small CNN used by the tests: convolution, batch norm, pooling, a classifier."""
import torch
from torch import nn

def build_model():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(1024, 1000))

def example_inputs(batch_size):
    return torch.randn(batch_size, 3, 64, 64)
