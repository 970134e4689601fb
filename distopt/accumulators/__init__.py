"""Φ stage: accumulation (momentum, moments, averaging)."""
from distopt.accumulators.moments import FirstMoment, SecondMoment, bias_correction
from distopt.accumulators.momentum import HeavyBall

__all__ = ["FirstMoment", "HeavyBall", "SecondMoment", "bias_correction"]
