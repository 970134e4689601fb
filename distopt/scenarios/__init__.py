"""T stage: scenario transforms (regularizers, clipping, privacy, compression, memory)."""
from distopt.scenarios.regularization import AddWeightDecay

__all__ = ["AddWeightDecay"]
