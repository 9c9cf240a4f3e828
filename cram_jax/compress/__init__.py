"""Compression operators on params pytrees.

Each is a factory returning ``compress(params, key=None) -> (compressed, masks)``.
"""

from cram_jax.compress.base import apply_masks, check_masks, random_choice
from cram_jax.compress.distribution import (
    Distribution,
    custom,
    erk,
    uniform,
)
from cram_jax.compress.magnitude import global_magnitude, layerwise_magnitude
from cram_jax.compress.nm import n_of_m, nm_mask
from cram_jax.compress.quantize import fake_quantize, quantize
from cram_jax.compress.select import DEFAULT, Selection, path_str, selected

__all__ = [
    "DEFAULT",
    "Distribution",
    "Selection",
    "apply_masks",
    "check_masks",
    "custom",
    "erk",
    "fake_quantize",
    "global_magnitude",
    "layerwise_magnitude",
    "n_of_m",
    "nm_mask",
    "path_str",
    "quantize",
    "random_choice",
    "selected",
    "uniform",
]
