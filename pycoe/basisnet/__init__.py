"""BasisNet (Zhang et al., "BasisNet: Two-Stage Model Synthesis for Efficient Inference", arXiv:2105.03014).

A lightweight model previews the input and produces per-sample coefficients that synthesise a specialist model
from basis models (every basis layer mixes its N kernels with the same coefficients); confident samples exit on
the lightweight model's own prediction.
"""

from pycoe.basisnet import model, specialist
from pycoe.basisnet.model import *
from pycoe.basisnet.specialist import *

__all__ = [*model.__all__, *specialist.__all__]
