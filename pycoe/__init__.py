"""pycoe: Collaboration of Experts for PyTorch.

The names of the CoE workflow and the layers are re-exported here; everything else is reached through the
subpackages:

- :mod:`pycoe.coe`: the expert pool, the CoE model and its loss;
- :mod:`pycoe.twostage`: what CoE, BasisNet and the cascade share: the delegator (the first stage), the two-stage
  protocol, the early-exit rule, prediction, the accuracy-FLOPs sweep and the calibration of the exit threshold;
- :mod:`pycoe.routing`: the balanced transportation solver, the WGM and the LGM, routing metrics;
- :mod:`pycoe.layers`: :class:`PWLU`, :class:`CondConv2d` and the conversion helpers;
- :mod:`pycoe.functional`: the pure-function forms (``pwlu``, ``mixture_conv2d``, co-training losses);
- :mod:`pycoe.basisnet`: BasisNet (a lightweight model synthesises a specialist from basis models);
- :mod:`pycoe.cotrain`: Divide-and-Co-training;
- :mod:`pycoe.export`: ``torch.export``/ONNX export, BatchNorm folding and compiled inference of a trained model;
- :mod:`pycoe.flops`, :mod:`pycoe.checkpoint`, :mod:`pycoe.distributed`, :mod:`pycoe.utils`: utilities.
"""

from pycoe import (
    basisnet,
    checkpoint,
    coe,
    cotrain,
    distributed,
    export,
    flops,
    functional,
    layers,
    routing,
    twostage,
    utils,
)
from pycoe.checkpoint import load_checkpoint, save_checkpoint
from pycoe.coe import CoE, CoELoss, ExpertPool
from pycoe.flops import count_flops
from pycoe.layers import PWLU, CondConv2d, convert_activations_to_pwlu, convert_conv2d_to_condconv, realign_pwlu
from pycoe.routing import BalancedTransportWeighter, LabelGenerator, balanced_assignment
from pycoe.twostage import Delegator, calibrate_exit_threshold, threshold_sweep

__version__ = "0.1.0.dev0"

# The curated top-level API: the one list that repeats names defined elsewhere (each is also in the __all__ of the
# module that defines it).
__all__ = [
    "Delegator",
    "ExpertPool",
    "CoE",
    "CoELoss",
    "BalancedTransportWeighter",
    "LabelGenerator",
    "balanced_assignment",
    "threshold_sweep",
    "calibrate_exit_threshold",
    "count_flops",
    "PWLU",
    "CondConv2d",
    "convert_activations_to_pwlu",
    "convert_conv2d_to_condconv",
    "realign_pwlu",
    "save_checkpoint",
    "load_checkpoint",
    "basisnet",
    "checkpoint",
    "coe",
    "cotrain",
    "distributed",
    "export",
    "flops",
    "functional",
    "layers",
    "routing",
    "twostage",
    "utils",
]
