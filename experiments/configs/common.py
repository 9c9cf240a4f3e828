"""Defaults shared by every run; each config file overrides what its recipe says.

Every field and its default is stated once, in `base_config`; every field is read
as an attribute, so a misspelt one (`--config.cram.rhoo=0.1`) is an error that
names it.

Field reference (all runs):
  task, dataset, train_split, eval_split, data_dir, data_options: what to train on.
  model, model_kwargs, num_classes, dtype ('float32' | 'bfloat16' compute; params f32).
  init_checkpoint: pretrained weights to start from ('' : none; BERT).
  name: the method's name (a preset below), for logs and the one-shot table.
  optimizer.base: 'sgd' (momentum, coupled weight decay) | 'adamw' (b1, b2, eps,
    decoupled weight decay on kernels and embeddings); optimizer.learning_rate,
    weight_decay, momentum, b1, b2, eps.
  optimizer.wrapper: 'none' | 'sam' (optax.contrib.sam, sam.rho) | 'cram' |
    'gmp' | 'acdc' (the pruning baselines, docs/baselines.md).
  cram.rho; cram.plus (CrAM+: add the clean gradient); cram.compressor, the
    compression during training: 'global' | 'layerwise' magnitude at one of
    cram.sparsities per step, 'nm' with one of cram.nm_patterns per step,
    'quantize' to one of cram.bits per step; cram.local_perturbation
    (m-sharpness: per-replica perturbation, needs parallel='pmap').
  gmp.*: gradual magnitude pruning (cram_jax.gmp), epochs turned into steps:
    initial_sparsity (reached at begin_epoch), final_sparsity (at end_epoch),
    frequency_epochs between mask updates, power (3: cubic), compressor
    'global' | 'layerwise' | 'erk'. Masks are fixed after end_epoch.
  acdc.*: AC/DC (cram_jax.acdc): sparsity, compressor (as gmp's), dense
    warmup_epochs, phase_epochs per compressed or dense phase, final_epochs
    (the final compressed phase: the run's last epochs), reset_momentum.
  distill.*: knowledge distillation (task 'squad' only): teacher_checkpoint (a
    fine-tuned BERT .safetensors; '' = off), weight w and temperature T of
    loss = (1 - w) * hard + w * T^2 * KL(teacher || student).
  num_epochs, warmup_epochs, schedule_per_epoch, num_train_steps (0: epochs decide).
  batch_size (global), eval_batch_size (global), seed.
  parallel: 'jit' (device mesh, default) | 'pmap'; num_devices (0: all);
    distributed.* for multi-host start-up.
  checkpoint_every_steps, keep_checkpoints, log_every_steps, prefetch, data_threads.
  oneshot.*: the sweep of experiments/oneshot.py.

Methods (`--config FILE:METHOD`) are presets over these fields, see `PRESETS`
and `method_fields`: sgd, adamw, sam, cram+-multi, cram+-multi-high, cram+-nm,
cram+-kNN and cram-kNN (one global sparsity of NN%), gmp-NN and acdc-NN (the
pruning baselines at NN% sparsity, their schedules from the config file).
"""

import re
from typing import Any

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "vision"
  c.dataset = "cifar10"
  c.train_split = "train"
  c.eval_split = "test"
  c.data_dir = config_dict.placeholder(str)
  c.data_options = ml_collections.ConfigDict()
  c.model = "ResNet20"
  c.model_kwargs = ml_collections.ConfigDict()
  c.num_classes = 10
  c.dtype = "float32"

  c.init_checkpoint = ""

  c.name = ""
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base = "sgd"
  c.optimizer.wrapper = "none"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.optimizer.momentum = 0.9
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.sam = ml_collections.ConfigDict()
  c.sam.rho = 0.05
  c.cram = ml_collections.ConfigDict()
  c.cram.rho = 0.05
  c.cram.plus = True
  c.cram.compressor = "global"
  c.cram.sparsities = (0.5, 0.7, 0.9)
  c.cram.nm_patterns = ((2, 4), (4, 8))
  c.cram.bits = (8,)
  c.cram.local_perturbation = False

  # Baselines (docs/baselines.md); the schedules suit a 200-epoch run.
  c.gmp = ml_collections.ConfigDict()
  c.gmp.initial_sparsity = 0.0
  c.gmp.final_sparsity = 0.9
  c.gmp.begin_epoch = 10.0
  c.gmp.end_epoch = 140.0
  c.gmp.frequency_epochs = 2.0
  c.gmp.power = 3.0
  c.gmp.compressor = "global"
  c.acdc = ml_collections.ConfigDict()
  c.acdc.sparsity = 0.9
  c.acdc.compressor = "global"
  c.acdc.warmup_epochs = 10.0
  c.acdc.phase_epochs = 5.0
  c.acdc.final_epochs = 30.0
  c.acdc.reset_momentum = False
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_checkpoint = ""
  c.distill.weight = 0.5
  c.distill.temperature = 2.0

  c.num_epochs = 200
  c.warmup_epochs = 0.0
  c.schedule_per_epoch = True
  c.num_train_steps = 0
  c.batch_size = 128
  c.eval_batch_size = 200
  c.seed = 10

  c.parallel = "jit"
  c.num_devices = 0  # 0: every device
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)

  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50
  c.prefetch = 2
  c.data_threads = 0
  c.progress = True

  c.oneshot = ml_collections.ConfigDict()
  c.oneshot.sparsities = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
  c.oneshot.nm_patterns = ((2, 4), (4, 8))
  c.oneshot.bn_images = 1000
  c.oneshot.bn_batches = 100
  c.oneshot.bn_batch_size = 128
  return c


_CRAM = {"optimizer.wrapper": "cram", "cram.plus": True}

# The named methods of the paper, as the fields they set (the others keep the
# config file's values: its base optimiser, rho, levels).
PRESETS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer.base": "sgd", "optimizer.wrapper": "none"},
    "adamw": {"optimizer.base": "adamw", "optimizer.wrapper": "none"},
    "sam": {"optimizer.wrapper": "sam"},
    "cram+-multi": {**_CRAM, "cram.compressor": "global"},
    # ResNet-20's high-sparsity recipe (docs/method.md section 7).
    "cram+-multi-high": {
        **_CRAM,
        "cram.compressor": "global",
        "cram.sparsities": (0.5, 0.7, 0.8, 0.9, 0.95),
        "cram.rho": 0.15,
    },
    "cram+-nm": {**_CRAM, "cram.compressor": "nm"},
}
_ONE_SPARSITY = re.compile(r"(cram\+?)-k(\d{1,2})")  # cram+-k95, cram-k90
_BASELINE = re.compile(r"(gmp|acdc)-(\d{1,2})")  # gmp-90, acdc-80


def method_fields(method: str) -> dict[str, Any]:
  """The fields (dotted names) a method preset sets.

  Raises:
    ValueError: naming the method and the presets, for an unknown method.
  """
  if method in PRESETS:
    return dict(PRESETS[method])
  one = _ONE_SPARSITY.fullmatch(method)
  if one:
    return {
        "optimizer.wrapper": "cram",
        "cram.plus": one.group(1) == "cram+",
        "cram.compressor": "global",
        "cram.sparsities": (int(one.group(2)) / 100,),
    }
  baseline = _BASELINE.fullmatch(method)
  if baseline:
    wrapper, percent = baseline.group(1), int(baseline.group(2))
    field = "gmp.final_sparsity" if wrapper == "gmp" else "acdc.sparsity"
    return {"optimizer.wrapper": wrapper, field: percent / 100}
  raise ValueError(
      f"method {method!r} is not one of {tuple(PRESETS)}, 'cram+-kNN', "
      "'cram-kNN', 'gmp-NN' or 'acdc-NN' (NN: a sparsity in percent, e.g. "
      "cram+-k95, gmp-90)"
  )


def set_method(
    c: ml_collections.ConfigDict, method: str
) -> ml_collections.ConfigDict:
  """Sets `c.name` and the fields of `method` (see `method_fields`)."""
  c.name = method
  for name, value in method_fields(method).items():
    group, field = name.split(".")
    c[group][field] = value
  return c
