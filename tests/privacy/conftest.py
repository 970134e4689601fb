"""Privacy tests run tiny models: one torch thread per test (restored afterwards). On a busy
2-core machine two OpenMP threads made a 64x2 cross-entropy 500x slower (36 ms vs 0.07 ms)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
