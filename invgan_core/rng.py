"""Counter-based randomness: numbers that depend only on (seed, example id, restart, step, coordinate).

The same example gets the same random start and the same stochastic-clipping draws whether it runs
alone, in a batch of 256, on 1 worker or on 16 (docs/architecture.md, conventions). The numbers come from
a splitmix64-style integer hash evaluated on whole tensors at once, so there is no per-example
`torch.Generator` and no Python loop over examples.
"""

from __future__ import annotations

import math

import torch

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); multiplication wraps.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
_MASK53 = (1 << 53) - 1


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic: it would copy the sign bit in)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x * _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def hash_keys(*parts: torch.Tensor | int) -> torch.Tensor:
    """Chain-hash broadcastable int64 tensors (or ints) into one int64 key per element, on the device of the first
    tensor among `parts` (int64 arithmetic wraps alike on every device: the same keys on a CPU and a GPU)."""
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
    h = torch.zeros((), dtype=torch.int64, device=device)
    for p in parts:
        h = _mix(h ^ _mix(torch.as_tensor(p, dtype=torch.int64, device=device) + 1))
    return h


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) from int64 keys (53 random bits each)."""
    bits = _mix(keys) >> 11 & _MASK53
    return (bits.to(torch.float64) / float(1 << 53)).to(torch.float32)


def normal(keys: torch.Tensor) -> torch.Tensor:
    """Standard normal floats via Box-Muller on two independent uniforms per key."""
    u1 = uniform(hash_keys(keys, 1)).clamp_min(1e-12)
    u2 = uniform(hash_keys(keys, 2))
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def latent_keys(seed: int, ids: torch.Tensor, restarts: int, dim: int, step: int = -1) -> torch.Tensor:
    """Keys of shape (N, R, d) for latent coordinates of each (example id, restart) at `step`."""
    # a tensor of ids keeps its device and the keys follow it (a list of ids: the CPU)
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1, 1, 1)
    r = torch.arange(restarts, dtype=torch.int64, device=ids.device).reshape(1, -1, 1)
    k = torch.arange(dim, dtype=torch.int64, device=ids.device).reshape(1, 1, -1)
    return hash_keys(seed, ids, r, step, k)


def sample_latents(prior: str, seed: int, ids: torch.Tensor, restarts: int, dim: int) -> torch.Tensor:
    """Per-example prior samples (N, R, d): standard normal or uniform on [-1, 1]^d."""
    keys = latent_keys(seed, ids, restarts, dim)
    if prior == "normal":
        return normal(keys)
    if prior == "uniform":
        return uniform(keys) * 2 - 1
    raise ValueError(f"unknown prior {prior!r}; choose 'normal' or 'uniform'")
