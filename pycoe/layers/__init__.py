"""Layers: PWLU and CondConv2d, with helpers that convert an existing model's layers in place."""

from pycoe.layers._convert import ConversionReport
from pycoe.layers.condconv import CondConv2d, CondConvRouter, convert_conv2d_to_condconv
from pycoe.layers.pwlu import PWLU, realign_pwlu
from pycoe.layers.pwlu_convert import DEFAULT_PWLU_ACTIVATIONS, convert_activations_to_pwlu

__all__ = [
    "PWLU",
    "realign_pwlu",
    "convert_activations_to_pwlu",
    "DEFAULT_PWLU_ACTIVATIONS",
    "CondConv2d",
    "CondConvRouter",
    "convert_conv2d_to_condconv",
    "ConversionReport",
]
