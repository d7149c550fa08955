"""The Collaboration-of-Experts model: expert pool, the model and its loss (alone or bundled with the model for
trainers).

The delegator (the first stage, which BasisNet shares), the early-exit rule, prediction over a loader, the
accuracy-FLOPs sweep and the calibration of the exit threshold live in :mod:`pycoe.twostage`. ``Delegator`` and
``DelegatorOutput`` are importable from here too (``from pycoe.coe import Delegator``), for a CoE user's
convenience; they are documented in :mod:`pycoe.twostage.delegator`.
"""

from pycoe.coe import experts, loss, model, with_loss
from pycoe.coe.experts import *
from pycoe.coe.loss import *
from pycoe.coe.model import *
from pycoe.coe.with_loss import *
from pycoe.twostage.delegator import Delegator, DelegatorOutput  # noqa: F401  (the first stage, re-exported)

__all__ = [
    *experts.__all__,
    *model.__all__,
    *loss.__all__,
    *with_loss.__all__,
]
