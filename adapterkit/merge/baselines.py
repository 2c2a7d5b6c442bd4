"""Baseline merges, exact on full delta weights dW_i = W_i - W0 (float64), module by module.

- sum (task arithmetic):  dW = sum_i w_i dW_i                        (w_i = 1 unless --weights)
- linear (average):       dW = sum_i w_i dW_i / sum_i w_i              (plain mean unless --weights)
- ties:                   peft.utils.merge_utils.ties on the full deltas (trim to `density`, elect sign, disjoint mean)
- dare:                   peft.utils.merge_utils.dare_linear on the full deltas (random drop, rescale), seeded
- svd:                    the exact sum, truncated to its top `rank` singular directions per module

peft's `add_weighted_adapter` is deliberately not used: except for `cat` and a wide enough `svd`, it combines the
LoRA A and B factors separately and adds cross terms (REFERENCE.md, baseline traps). A module that an adapter does
not touch counts as dW_i = 0 for it.
"""

from __future__ import annotations

import torch

from ..errors import AdapterkitError
from .methods import BASELINES as METHODS
from .methods import DEFAULT_DENSITY, MergeOptions, check_options, get


def resolve_weights(method: str, weights: list[float] | None, count: int) -> torch.Tensor:
    """(n,) float64 weights (checked by methods.check_options); `linear` normalises them to sum 1."""
    if weights is None:
        weights = [1.0] * count
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if get(method).normalised:
        w = w / w.sum()
    return w


def combine(
    method: str,
    deltas: list[dict[str, torch.Tensor]],
    weights: list[float] | None = None,
    density: float = DEFAULT_DENSITY,
    seed: int = 0,
    rank: int | None = None,
) -> dict[str, torch.Tensor]:
    """Module -> merged dW (float64) over the union of modules the adapters touch."""
    if method not in METHODS:
        raise AdapterkitError(f"unknown baseline merge '{method}'; use one of {', '.join(METHODS)}")
    check_options(method, MergeOptions(weights=weights, density=density, seed=seed, rank=rank), count=len(deltas))
    w = resolve_weights(method, weights, len(deltas))
    modules = sorted(set().union(*(d.keys() for d in deltas)))
    merged = {}
    # DARE draws its drop masks from torch's global generator: fork it, seed once, visit modules in sorted order.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in modules:
            like = next(d[name] for d in deltas if name in d)
            stack = [d.get(name, torch.zeros_like(like)) for d in deltas]
            merged[name] = _combine_module(method, stack, w, density, rank)
    return merged


def _combine_module(method: str, stack: list[torch.Tensor], w: torch.Tensor, density: float, rank: int | None) -> torch.Tensor:
    from peft.utils import merge_utils

    if method in ("sum", "linear"):
        return merge_utils.task_arithmetic(stack, w)
    if method == "ties":
        return merge_utils.ties(stack, w, density)
    if method == "dare":
        return merge_utils.dare_linear(stack, w, density)
    return truncate(merge_utils.task_arithmetic(stack, w), rank)


def truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of `delta` (Eckart-Young), via its SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.shape[0])
    return (u[:, :r] * s[:r]) @ vh[:r]


def factor(delta: torch.Tensor, rank: int | None = None, rtol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """delta = B A exactly (to float rounding): B = U sqrt(S), A = sqrt(S) V^T over the numerical rank (or `rank`)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = rank if rank is not None else int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    r = min(r, s.shape[0])
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]
