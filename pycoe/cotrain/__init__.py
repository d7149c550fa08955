"""Divide-and-Co-training: divide a network into S narrower ones, co-train them on several views, ensemble.

- :mod:`pycoe.cotrain.width`: the width at which a model built by a factory has 1/S of the parameters;
- :mod:`pycoe.cotrain.divide`: the generic division of an instantiated model (by tracing);
- :mod:`pycoe.cotrain.ensemble`: the co-trained ensemble and the co-training loss;
- :mod:`pycoe.cotrain.schedule`: the regularisation scaling and the co-training weight warm-up;
- :mod:`pycoe.cotrain.views`: S augmented views of every sample.
"""

from pycoe.cotrain import divide, ensemble, schedule, views, width
from pycoe.cotrain.divide import *
from pycoe.cotrain.ensemble import *
from pycoe.cotrain.schedule import *
from pycoe.cotrain.views import *
from pycoe.cotrain.width import *

__all__ = [*width.__all__, *divide.__all__, *ensemble.__all__, *schedule.__all__, *views.__all__]
