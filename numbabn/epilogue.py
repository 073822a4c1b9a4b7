"""What follows the normalisation in the same pass: a residual add and a ReLU."""

from __future__ import annotations

from typing import Any, NamedTuple

ACTIVATIONS = (None, "relu")


class Epilogue(NamedTuple):
    """``relu(bn(x) + residual)``, either part optional.

    Attributes
    ----------
    residual : array or None
        Added to the normalised output before the activation (shape and dtype of ``x``).
    relu : bool
        Whether a ReLU follows.
    """

    residual: Any
    relu: bool


def check_activation(activation: str | None) -> None:
    """Raise ValueError unless ``activation`` is None or "relu"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")


def epilogue_for(residual: Any, activation: str | None) -> Epilogue | None:
    """The epilogue for a call, or None when there is nothing to fuse."""
    check_activation(activation)
    if residual is None and activation is None:
        return None
    return Epilogue(residual, activation == "relu")
