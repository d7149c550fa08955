"""The Collaboration-of-Experts model: delegator, expert pool, the early-exit rule, the model, its loss (alone or
bundled with the model for trainers), its evaluation and the calibration of the exit threshold."""

from pycoe.coe import calibrate, delegator, early_exit, evaluate, experts, loss, model, with_loss
from pycoe.coe.calibrate import *
from pycoe.coe.delegator import *
from pycoe.coe.early_exit import *
from pycoe.coe.evaluate import *
from pycoe.coe.experts import *
from pycoe.coe.loss import *
from pycoe.coe.model import *
from pycoe.coe.with_loss import *

__all__ = [
    *delegator.__all__,
    *experts.__all__,
    *early_exit.__all__,
    *model.__all__,
    *loss.__all__,
    *with_loss.__all__,
    *evaluate.__all__,
    *calibrate.__all__,
]
