"""P stage: preconditioning, projection and the parameter update."""
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.diagonal import RootMomentPreconditioner

__all__ = ["ApplyLR", "DecoupledWeightDecay", "RootMomentPreconditioner"]
