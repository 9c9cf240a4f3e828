"""Defaults shared by every run; each config file overrides what its recipe says.

Field reference (all runs):
  task, dataset, train_split, eval_split, data_dir, data_options: what to train on.
  model, model_kwargs, num_classes, dtype ('float32' | 'bfloat16' compute; params f32).
  optimizer: sgd | adamw | sam | cram | cram+ | cram+-multi | cram+-nm (experiments/optimizers.py);
    base_optimizer (sgd | adamw) under sam/cram; learning_rate, momentum, weight_decay;
    rho; sparsity (cram, cram+); sparsities (cram+-multi); nm_patterns (cram+-nm);
    local_perturbation (m-sharpness: per-replica perturbation, needs parallel='pmap').
  num_epochs, warmup_epochs, schedule_per_epoch, num_train_steps (0: epochs decide).
  batch_size (global), eval_batch_size (global), seed.
  parallel: 'jit' (device mesh, default) | 'pmap'; num_devices (0: all);
    distributed.* for multi-host start-up.
  checkpoint_every_steps, keep_checkpoints, log_every_steps, prefetch, data_threads.
  oneshot.*: the sweep of experiments/oneshot.py.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
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

  c.optimizer = "sgd"
  c.base_optimizer = "sgd"
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.rho = 0.0
  c.sparsity = 0.0
  c.sparsities = (0.5, 0.7, 0.9)
  c.nm_patterns = ((2, 4), (4, 8))
  c.local_perturbation = False

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


def set_method(
    c: ml_collections.ConfigDict,
    method: str,
    *,
    rho: float,
    sparsities=None,
    sparsity=None,
) -> ml_collections.ConfigDict:
  """Applies a method name: 'sgd', 'sam', 'cram+-multi', 'cram+-k95', 'cram+-nm', ..."""
  c.name = method
  if method.startswith("cram+-k"):  # CrAM+-k{s}: one global sparsity s%
    c.optimizer, c.sparsity = (
        "cram+",
        sparsity if sparsity is not None else int(method[7:]) / 100,
    )
  elif method.startswith("cram-k"):
    c.optimizer, c.sparsity = (
        "cram",
        sparsity if sparsity is not None else int(method[6:]) / 100,
    )
  else:
    c.optimizer = method
  if c.optimizer != "sgd" and c.optimizer != "adamw":
    c.rho = rho
  if sparsities is not None:
    c.sparsities = tuple(sparsities)
  return c
