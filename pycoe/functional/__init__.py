"""Pure functions: the PWLU activation, the mixture convolution, the co-training losses and per-sample task
losses."""

from pycoe.functional.cotrain import js_divergence, pairwise_kl
from pycoe.functional.losses import per_sample_cross_entropy
from pycoe.functional.mixture import MIXTURE_STRATEGIES, choose_mixture_strategy, mixture_conv2d
from pycoe.functional.pwlu import pwlu

__all__ = [
    "pwlu",
    "mixture_conv2d",
    "choose_mixture_strategy",
    "MIXTURE_STRATEGIES",
    "js_divergence",
    "pairwise_kl",
    "per_sample_cross_entropy",
]
