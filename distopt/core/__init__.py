"""Operator protocol, chain, optimizer shell, hyperparameters and registry."""
from distopt.core.chain import Chain, chain
from distopt.core.hyper import Hyper
from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.core.registry import FAMILIES, available, create, get, register
from distopt.core.shell import ChainOptimizer, DistOptimizer
from distopt.core.tensor_ops import TensorOps

__all__ = [
    "FAMILIES", "Chain", "ChainOptimizer", "DistOptimizer", "Hyper", "Locality", "Operator", "Stage",
    "StepContext", "TensorOps", "available", "chain", "create", "get", "register",
]
