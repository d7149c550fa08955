"""Divide-and-Co-training: divide a network into S narrower ones, co-train them on several views, ensemble."""

from pycoe.cotrain.divide import (
    DivisionError,
    WidthSearch,
    count_parameters,
    divide_by_factory,
    divide_module,
    round_to_multiple,
    search_width,
)
from pycoe.cotrain.ensemble import CoTrainingEnsemble, CoTrainingLoss, CoTrainingOutput, combine_outputs
from pycoe.cotrain.schedule import (
    LinearWarmup,
    apply_dropout_scaling,
    linear_warmup,
    scale_dropout,
    scale_weight_decay,
)
from pycoe.cotrain.views import MultiViewDataset, multiview_collate

__all__ = [
    "divide_by_factory",
    "divide_module",
    "search_width",
    "count_parameters",
    "round_to_multiple",
    "WidthSearch",
    "DivisionError",
    "CoTrainingEnsemble",
    "CoTrainingOutput",
    "CoTrainingLoss",
    "combine_outputs",
    "MultiViewDataset",
    "multiview_collate",
    "linear_warmup",
    "LinearWarmup",
    "scale_weight_decay",
    "scale_dropout",
    "apply_dropout_scaling",
]
