"""pycoe: Collaboration of Experts for PyTorch.

The main classes are re-exported here; the subpackages hold the rest:

- :mod:`pycoe.coe`: :class:`Delegator`, :class:`ExpertPool`, :class:`CoE`, :class:`CoELoss`, evaluation;
- :mod:`pycoe.routing`: the balanced transportation solver, :class:`BalancedTransportWeighter` (WGM),
  :class:`LabelGenerator` (LGM) and routing metrics;
- :mod:`pycoe.layers`: :class:`PWLU`, :class:`CondConv2d` and the conversion helpers;
- :mod:`pycoe.functional`: the pure-function forms (``pwlu``, ``mixture_conv2d``, co-training losses);
- :mod:`pycoe.cotrain`: Divide-and-Co-training;
- :mod:`pycoe.basisnet`: BasisNet (a lightweight model synthesises a specialist from basis models);
- :mod:`pycoe.flops`, :mod:`pycoe.checkpoint`, :mod:`pycoe.distributed`: utilities.
"""

from pycoe import basisnet, checkpoint, coe, cotrain, distributed, flops, functional, layers, routing
from pycoe.basisnet import BasisNet, BasisSpecialist
from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.coe import (
    CoE,
    CoELoss,
    CoEOutput,
    CoETrainOutput,
    Delegator,
    DelegatorOutput,
    ExpertPool,
    predict,
    threshold_sweep,
)
from pycoe.cotrain import CoTrainingEnsemble, divide_by_factory, divide_module
from pycoe.flops import count_flops, flops_per_sample
from pycoe.layers import (
    PWLU,
    CondConv2d,
    CondConvRouter,
    convert_activations_to_pwlu,
    convert_conv2d_to_condconv,
    realign_pwlu,
)
from pycoe.routing import (
    BalancedTransportWeighter,
    LabelGenerator,
    balanced_assignment,
    solve_balanced_transport,
)

__version__ = "0.1.0.dev0"

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
    "BalancedTransportWeighter",
    "LabelGenerator",
    "balanced_assignment",
    "solve_balanced_transport",
    "PWLU",
    "realign_pwlu",
    "convert_activations_to_pwlu",
    "CondConv2d",
    "CondConvRouter",
    "convert_conv2d_to_condconv",
    "BasisNet",
    "BasisSpecialist",
    "CoTrainingEnsemble",
    "divide_by_factory",
    "divide_module",
    "count_flops",
    "flops_per_sample",
    "save_checkpoint",
    "load_checkpoint",
    "basisnet",
    "checkpoint",
    "coe",
    "cotrain",
    "distributed",
    "flops",
    "functional",
    "layers",
    "routing",
]
