"""Keep optimizer-state dtypes through ``load_state_dict``.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor (all but
``step``) to its parameter's dtype, and integer tensors too when the parameter is floating. Recipes
whose state is deliberately of another dtype (float32 Kronecker or PSGD factors of bfloat16
weights, uint8 codes and float32 scales of 8-bit moments, int64 failure counters) set
``DistOptimizer.keep_state_dtypes = True``; the shell then calls :func:`restore_saved_dtypes`
after the usual load, so a resumed run is bit-identical.
"""
from __future__ import annotations

from typing import Any

import torch


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Put back, on the param's device, every saved state tensor whose dtype the load changed."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in zip(saved_ids, params):
        saved, state = state_dict["state"].get(i, {}), optimizer.state[p]
        for key, value in saved.items():
            if key == "step" or not isinstance(value, torch.Tensor) or not isinstance(state.get(key), torch.Tensor):
                continue
            if state[key].dtype != value.dtype:
                state[key] = value.to(device=p.device, copy=True)
