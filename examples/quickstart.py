"""A first session with numbabn: float64 data, a PyTorch CPU tensor, a training loop.

Run it with ``python examples/quickstart.py``; it takes a few seconds (compilation).
The PyTorch part runs when PyTorch is installed (numbabn never needs it).
"""

import numpy as np

import numbabn as nbn

try:
    import torch
except ImportError:
    torch = None

# 1. The first call: float64 data, a default (float32) module.
x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
try:
    nbn.BatchNorm2d(3)(x)
except RuntimeError as error:
    print("RuntimeError:", error)
bn = nbn.BatchNorm2d(3, dtype=np.float64)  # remedy 1 (or nbn.BatchNorm2d(3).double())
print(bn(x).dtype, nbn.BatchNorm2d(3)(x.astype(np.float32)).dtype)  # remedy 2

# 2. A PyTorch CPU tensor round trip: used in place, a tensor comes back.
if torch is not None:
    t = torch.randn(8, 3, 4, 4)
    bn = nbn.BatchNorm2d(3)
    y = bn(t)
    dx = bn.backward(torch.ones_like(t))
    print(type(y).__name__, type(dx).__name__, type(bn.grads["weight"]).__name__)
    print(torch.allclose(y, torch.nn.BatchNorm2d(3)(t), atol=1e-5))

# 3. A training loop on parameters(): plain SGD, no subclass.
rng = np.random.default_rng(1)
bn = nbn.BatchNorm1d(4)
target_scale, target_shift = np.array([2.0, 0.5, 1.0, 3.0]), np.array([1.0, -1.0, 0.0, 2.0])
for _ in range(200):
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = bn(x)
    bn.zero_grad()
    bn.backward(y - (target_scale * (x - x.mean(0)) / x.std(0) + target_shift).astype(np.float32))
    for name, param in bn.named_parameters():
        param -= 0.05 * bn.grads[name] / len(x)
print({name: np.round(param, 2) for name, param in bn.named_parameters()})
