"""The Collaboration-of-Experts model: delegator, expert pool, the model and its loss (alone or bundled with the
model for trainers).

The early-exit rule, prediction over a loader, the accuracy-FLOPs sweep and the calibration of the exit threshold
are shared with BasisNet and live in :mod:`pycoe.twostage`.
"""

from pycoe.coe import delegator, experts, loss, model, with_loss
from pycoe.coe.delegator import *
from pycoe.coe.experts import *
from pycoe.coe.loss import *
from pycoe.coe.model import *
from pycoe.coe.with_loss import *

__all__ = [
    *delegator.__all__,
    *experts.__all__,
    *model.__all__,
    *loss.__all__,
    *with_loss.__all__,
]
