"""cram_jax: Compression-Aware Minimization (CrAM) for JAX and Optax.

Train with :func:`cram`, prune once with :func:`prune`, re-estimate BatchNorm
statistics with :func:`recalibrate_batch_stats`. Flax NNX models: see
:mod:`cram_jax.nnx` and :func:`cram_jax.models.as_nnx`.
"""

from cram_jax import nnx
from cram_jax.acdc import (
    ACDCState,
    acdc,
    acdc_compressed,
    acdc_dense_params,
)
from cram_jax.batchnorm import (
    calibration_batches,
    recalibrate_batch_stats,
    reset_batch_stats,
)
from cram_jax.compress import (
    Selection,
    apply_masks,
    check_masks,
    fake_quantize,
    global_magnitude,
    layerwise_magnitude,
    n_of_m,
    nm_mask,
    quantize,
    random_choice,
)
from cram_jax.cram import CrAMState, cram
from cram_jax.gmp import (
    GMPState,
    gmp,
    gmp_masks,
    gmp_schedule,
    gmp_update_steps,
)
from cram_jax.obs import fisher_gradients, obs_prune
from cram_jax.prune import (
    LeafSparsity,
    SparsityReport,
    keep_pruned,
    prune,
    sparsity_report,
    sparsity_summary,
)
from cram_jax.sparsegpt import gptq_quantize, layer_hessians, sparsegpt_prune

__version__ = "0.1.0"

__all__ = [
    "ACDCState",
    "GMPState",
    "acdc",
    "acdc_compressed",
    "acdc_dense_params",
    "gmp",
    "gmp_masks",
    "gmp_schedule",
    "gmp_update_steps",
    "CrAMState",
    "LeafSparsity",
    "Selection",
    "SparsityReport",
    "apply_masks",
    "calibration_batches",
    "check_masks",
    "cram",
    "fake_quantize",
    "fisher_gradients",
    "global_magnitude",
    "gptq_quantize",
    "keep_pruned",
    "layer_hessians",
    "layerwise_magnitude",
    "n_of_m",
    "nm_mask",
    "nnx",
    "obs_prune",
    "prune",
    "quantize",
    "random_choice",
    "recalibrate_batch_stats",
    "reset_batch_stats",
    "sparsegpt_prune",
    "sparsity_report",
    "sparsity_summary",
]
