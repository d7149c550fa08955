"""The Collaboration-of-Experts model: delegator, expert pool, the model, its loss and its evaluation."""

from pycoe.coe.delegator import Delegator, DelegatorOutput
from pycoe.coe.evaluate import predict, threshold_sweep
from pycoe.coe.experts import ExpertPool
from pycoe.coe.loss import CoELoss
from pycoe.coe.model import CoE, CoEOutput, CoETrainOutput

__all__ = [
    "Delegator",
    "DelegatorOutput",
    "ExpertPool",
    "CoE",
    "CoEOutput",
    "CoETrainOutput",
    "CoELoss",
    "predict",
    "threshold_sweep",
]
