"""memlint: lint PyTorch models and training code for memory before you rent a GPU.

Importing this package stays cheap (no torch); the estimator is loaded on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memlint.report import ModelReport


def estimate(model: Any, example_inputs: Any, **options: Any) -> "ModelReport":
    """Estimate the training-step memory of an ``nn.Module`` (see :func:`memlint.api.estimate`)."""
    from memlint.api import estimate as _estimate

    return _estimate(model, example_inputs, **options)
