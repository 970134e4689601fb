"""Shared fixtures-by-function for the privacy tests: a small float64 MLP, data with per-example
gradient norms on both sides of the clipping bound, and hand-computed clipped sums."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES, N_CLASSES = 6, 3


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, hidden: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES)).to(dtype)


def data(n: int = 12, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 4.0, n, dtype=dtype).unsqueeze(1)  # spreads the per-example gradient norms
    x = torch.randn(n, N_FEATURES, generator=g, dtype=dtype) * scale
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """One ordinary backward pass per example (sum-reduced loss of that example alone)."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad()
    return out


def clipped_sum(grads: list[list[torch.Tensor]], c: float, stabilizer: float = 0.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ_i min(1, C/(‖g_i‖ + stabilizer)) g_i, and the per-example norms ‖g_i‖."""
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    total = [torch.zeros_like(g) for g in grads[0]]
    for gi, n in zip(grads, norms):
        factor = min(1.0, c / (float(n) + stabilizer))
        for t, g in zip(total, gi):
            t.add_(g, alpha=factor)
    return total, norms


def train_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, criterion=None) -> None:
    """zero_grad, loss, backward, step: with ``criterion`` (ghost clipping's wrapper) or plain CE."""
    optimizer.zero_grad()
    out = model(x)
    loss = criterion(out, y) if criterion is not None else nn.functional.cross_entropy(out, y)
    loss.backward()
    optimizer.step()
