"""Differential privacy for every distopt optimizer, on top of Opacus (``pip install "distopt[dp]"``).

- :func:`make_private`: Opacus DP-SGD (per-sample clipping, Gaussian noise, Poisson sampling,
  RDP/PRV/GDP accounting; hooks or ghost clipping; DDP) around any recipe whose E stage is
  autograd, with clear refusals where the guarantee cannot hold; ``privacy_spent()``, a budget
  that stops training before it is exceeded, and the accountant inside ``state_dict()``.
- DP-AdamBC bias correction for Adam-family recipes (``bias_correction=True``).
- :func:`make_private_zo`: DP-ZO, privatising the projected-gradient scalar of two-point
  zeroth-order steps.

Opacus is imported only when one of these is called.
"""
from __future__ import annotations

from distopt.privacy.accounting import PrivacyBudgetExceeded, PrivacyState
from distopt.privacy.bias_correction import NoiseBiasCorrectedRootPreconditioner, bias_corrected
from distopt.privacy.engine import NotPrivatizable, PrivateOptimizerMixin, make_private, refusal
from distopt.privacy.zo import DPZeroOrderOptimizer, TwoPointEstimator, make_private_zo

__all__ = [
    "DPZeroOrderOptimizer", "NoiseBiasCorrectedRootPreconditioner", "NotPrivatizable", "PrivacyBudgetExceeded",
    "PrivacyState", "PrivateOptimizerMixin", "TwoPointEstimator", "bias_corrected", "make_private",
    "make_private_zo", "refusal",
]
