"""BasisNet (Zhang et al., "BasisNet: Two-Stage Model Synthesis for Efficient Inference", arXiv:2105.03014).

A lightweight model previews the input and produces per-sample coefficients that synthesise a specialist model
from basis models (every basis layer mixes its N kernels with the same coefficients); confident samples exit on
the lightweight model's own prediction.
"""

from pycoe.basisnet.model import (
    NORMALIZATIONS,
    BasisNet,
    BasisNetOutput,
    BasisNetTrainOutput,
    basis_coefficients,
    basis_dropout,
    basisnet_loss,
)
from pycoe.basisnet.specialist import BasisSpecialist

__all__ = [
    "BasisNet",
    "BasisNetOutput",
    "BasisNetTrainOutput",
    "BasisSpecialist",
    "basis_coefficients",
    "basis_dropout",
    "basisnet_loss",
    "NORMALIZATIONS",
]
