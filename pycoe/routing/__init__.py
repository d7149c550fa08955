"""Routing: the balanced transportation solver, WGM (loss weights), LGM (selection labels) and metrics."""

from pycoe.routing import labels, metrics, transport, weighting
from pycoe.routing.labels import *
from pycoe.routing.metrics import *
from pycoe.routing.transport import *
from pycoe.routing.weighting import *

__all__ = [*transport.__all__, *weighting.__all__, *labels.__all__, *metrics.__all__]
