"""Fold an inference-mode batch norm into the convolution or linear layer before it.

In evaluation mode a batch norm is a per-channel affine map built from its running
statistics, ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, so a
convolution or linear layer followed by it equals one layer with rescaled weights and a
shifted bias. The functions here compute those folded parameters with the arithmetic of
PyTorch's ``torch.nn.utils.fusion.fuse_conv_bn_weights`` and ``fuse_linear_bn_weights``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numbabn._validation import is_half

__all__ = ["fold_into_conv", "fold_into_linear"]


def _check_float_array(name: str, array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a NumPy array, got {type(array).__qualname__}")
    if not np.issubdtype(array.dtype, np.floating) and not is_half(array.dtype):
        raise ValueError(f"{name} must have a floating-point dtype, got {array.dtype}")
    return array


def _bn_parameters(bn: Any) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """Running mean and variance, eps, weight and bias of ``bn`` (ones/zeros where absent),
    in float32 where ``bn`` keeps 16-bit floats (exact).

    Read from ``bn.state_dict()``: host copies, whatever device ``bn`` is on.
    """
    if getattr(bn, "activation", None) is not None:
        raise ValueError(
            f"{type(bn).__name__} applies activation={bn.activation!r} after normalising; "
            "only a plain batch norm folds into the layer before it"
        )
    state = bn.state_dict()
    if "running_mean" not in state:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
            "folding needs the running mean and variance gathered in training"
        )
    running_mean, running_var = state["running_mean"], state["running_var"]
    weight = state.get("weight", np.ones_like(running_mean))
    bias = state.get("bias", np.zeros_like(running_mean))
    if is_half(running_mean.dtype):  # a .half()/.bfloat16() module: folded in float32
        running_mean, running_var, weight, bias = (
            array.astype(np.float32) for array in (running_mean, running_var, weight, bias)
        )
    return running_mean, running_var, bn.eps, weight, bias


def _check_channels(what: str, out_channels: int, bn: Any, hint: str = "") -> None:
    if out_channels != bn.num_features:
        raise ValueError(
            f"{what} has {out_channels} output channels but {type(bn).__name__} has "
            f"num_features={bn.num_features}; they must be equal{hint}"
        )


def _check_bias(bias: Any, out_channels: int, what: str) -> np.ndarray | None:
    if bias is None:
        return None
    _check_float_array(f"{what} bias", bias)
    if bias.shape != (out_channels,):
        raise ValueError(
            f"{what} bias must have shape ({out_channels},), one value per output channel, "
            f"got {bias.shape}"
        )
    return bias


def fold_into_conv(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: Any,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of one convolution equal to ``conv`` followed by ``bn`` in eval mode.

    Computes what ``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes, with
    ``bn``'s running statistics, ``eps``, weight and bias.

    Parameters
    ----------
    weight : ndarray
        Convolution weight, floating point: ``(out, in / groups, *kernel)`` as in
        ``torch.nn.Conv{1,2,3}d``, or ``(in, out, *kernel)`` with ``transpose=True``
        as in ``torch.nn.ConvTranspose{1,2,3}d`` (with ``groups=1``).
    bias : ndarray or None
        Convolution bias of shape ``(out,)``; None for a convolution without one.
    bn : BatchNorm1d, BatchNorm2d or BatchNorm3d
        A numbabn batch-norm module with running statistics and ``num_features == out``.
    transpose : bool, default False
        Whether ``weight`` is laid out as a transposed convolution's.

    Returns
    -------
    weight : ndarray
        Folded weight, of the shape and dtype of ``weight``.
    bias : ndarray
        Folded bias of shape ``(out,)``, of the dtype of ``bias`` (of ``weight`` when
        ``bias`` is None).

    Raises
    ------
    ValueError
        If ``bn`` keeps no running statistics, if ``weight`` is not a floating-point
        NumPy array with at least three axes, if its output-channel count differs from
        ``bn.num_features`` or if ``bias`` is not a float array of shape ``(out,)``.

    Notes
    -----
    The inputs and ``bn`` are not modified; the results are new arrays.
    """
    _check_float_array("conv weight", weight)
    if weight.ndim < 3:
        layout = "(in, out, *kernel)" if transpose else "(out, in / groups, *kernel)"
        raise ValueError(
            f"conv weight must have the layout {layout}, with at least 3 axes; "
            f"got shape {weight.shape} (use fold_into_linear for a linear layer's weight)"
        )
    running_mean, running_var, eps, bn_weight, bn_bias = _bn_parameters(bn)
    out_channels = weight.shape[1] if transpose else weight.shape[0]
    hint = ""
    if transpose:
        hint = " (a transposed convolution's weight is (in, out / groups, *kernel); groups=1 only)"
    _check_channels("conv weight", out_channels, bn, hint)
    bias = _check_bias(bias, out_channels, "conv")

    weight_dtype = weight.dtype
    bias_dtype = bias.dtype if bias is not None else weight_dtype
    if bias is None:
        bias = np.zeros_like(running_mean)
    inv_std = 1.0 / np.sqrt(running_var + eps)
    shape: tuple[int, ...] = (1, -1) if transpose else (-1, 1)
    shape += (1,) * (weight.ndim - 2)
    folded_weight = (weight * (bn_weight * inv_std).reshape(shape)).astype(weight_dtype)
    folded_bias = ((bias - running_mean) * inv_std * bn_weight + bn_bias).astype(bias_dtype)
    return folded_weight, folded_bias


def fold_into_linear(
    weight: np.ndarray,
    bias: np.ndarray | None,
    bn: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of one linear layer equal to ``linear`` followed by ``bn`` in eval mode.

    Computes what ``torch.nn.utils.fusion.fuse_linear_bn_weights`` computes, with
    ``bn``'s running statistics, ``eps``, weight (ones when absent) and bias (zeros
    when absent).

    Parameters
    ----------
    weight : ndarray
        Linear weight of shape ``(out, in)``, floating point, as in ``torch.nn.Linear``
        (the layer computes ``x @ weight.T + bias``).
    bias : ndarray or None
        Linear bias of shape ``(out,)``; None for a layer without one.
    bn : BatchNorm1d
        A numbabn batch-norm module with running statistics and ``num_features == out``.

    Returns
    -------
    weight : ndarray
        Folded weight, of the shape and dtype of ``weight``.
    bias : ndarray
        Folded bias of shape ``(out,)``, of the dtype of ``bias`` (of ``weight`` when
        ``bias`` is None).

    Raises
    ------
    ValueError
        If ``bn`` keeps no running statistics, if ``weight`` is not a 2-D floating-point
        NumPy array, if ``weight.shape[0]`` differs from ``bn.num_features`` or if
        ``bias`` is not a float array of shape ``(out,)``.

    Notes
    -----
    The inputs and ``bn`` are not modified; the results are new arrays.
    """
    _check_float_array("linear weight", weight)
    if weight.ndim != 2:
        raise ValueError(f"linear weight must have shape (out, in), got shape {weight.shape}")
    running_mean, running_var, eps, bn_weight, bn_bias = _bn_parameters(bn)
    out_channels = weight.shape[0]
    _check_channels("linear weight", out_channels, bn)
    bias = _check_bias(bias, out_channels, "linear")

    weight_dtype = weight.dtype
    bias_dtype = bias.dtype if bias is not None else weight_dtype
    if bias is None:
        bias = np.zeros_like(running_mean)
    scale = bn_weight * (1.0 / np.sqrt(running_var + eps))
    folded_weight = weight * scale[:, None].astype(weight_dtype)
    folded_bias = ((bias - running_mean) * scale + bn_bias).astype(bias_dtype)
    return folded_weight, folded_bias
