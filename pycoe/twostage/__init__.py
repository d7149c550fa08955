"""Two-stage models with early exit: the protocol, the exit rule, prediction, the sweep and the calibration.

:class:`~pycoe.coe.model.CoE` (a delegator, then one expert per sample), :class:`~pycoe.basisnet.model.BasisNet`
(a lightweight model, then the specialist it synthesises) and the cascade baseline (a rough head, then one network)
are all a first stage that may answer early and a second stage that runs on the samples that remain. What they
share is written once here, on that shape:

- :mod:`pycoe.twostage.delegator`: :class:`Delegator`, the first stage CoE and BasisNet share (a backbone with an
  expert-selection head and a rough head: BasisNet's lightweight model is a Delegator with K = N bases);
- :mod:`pycoe.twostage.model`: the protocol (:class:`TwoStageModel`, :class:`FirstStage`) and the early-exit
  forward written on it;
- :mod:`pycoe.twostage.rule`: the exit rule (:func:`rough_confidence`, :func:`exit_mask`);
- :mod:`pycoe.twostage.evaluate`: :func:`predict` and :func:`threshold_sweep` over a loader;
- :mod:`pycoe.twostage.calibrate`: :func:`calibrate_exit_threshold` on held-out data.

``pycoe.coe`` and ``pycoe.basisnet`` build on this package; it imports neither, and they import each other only
through it.
"""

from pycoe.twostage import calibrate, delegator, evaluate, model, rule
from pycoe.twostage.calibrate import *
from pycoe.twostage.delegator import *
from pycoe.twostage.evaluate import *
from pycoe.twostage.model import *
from pycoe.twostage.rule import *

__all__ = [*delegator.__all__, *model.__all__, *rule.__all__, *evaluate.__all__, *calibrate.__all__]
