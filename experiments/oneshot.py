"""One-shot compression sweep: load trained runs, compress once, re-estimate BatchNorm, evaluate.

  python experiments/oneshot.py --workdir runs/rn20_sgd --workdir runs/rn20_cram --out runs/oneshot
  python experiments/oneshot.py ... --pruners magnitude obs sparsegpt --quantizers 8 4

For each run (its newest intact checkpoint and its config.json), the pruners of
`config.oneshot.pruners` (default: magnitude only):
  magnitude: global and layer-wise magnitude pruning at `config.oneshot.sparsities`
    and N:M at `config.oneshot.nm_patterns`;
  obs: Optimal Brain Surgeon (cram_jax.obs), global at each sparsity and N:M, with
    an empirical Fisher from `obs_gradients` gradients of the evaluation-mode loss
    on calibration batches of `obs_batch_size` training images;
  sparsegpt: SparseGPT (cram_jax.sparsegpt), layer-wise (uniform) at each sparsity
    and N:M, with layer Hessians from `sparsegpt_batches` calibration batches;
then per-channel fake quantisation to each of `config.oneshot.quantizers` bits
(none by default) by each of `config.oneshot.quantize_methods`: 'rtn'
(round-to-nearest, cram_jax.quantize) and 'gptq' (cram_jax.sparsegpt, with
SparseGPT's Hessians). After every compression,
BatchNorm statistics are re-estimated on 1000 random training images (100 batches
of 128, training augmentation; skipped for models without BatchNorm), then the
task's evaluation. Fisher gradients and Hessians are computed once per run and
shared by all sparsities. Writes `oneshot.md` (the table), `oneshot.csv` and
`oneshot.png` (metric vs sparsity) to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` importable
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

import ml_collections
import numpy as np

import cram_jax
from cram_jax import compress
from cram_jax import data as data_lib
from experiments import cli
from experiments import train as train_lib


@dataclasses.dataclass(frozen=True)
class Result:
  method: str
  compression: str  # 'dense', 'global 90%', 'uniform 90%', '2:4', 'int8'
  kind: str  # 'dense' | 'global' | 'uniform' | 'n:m' | 'quantize'
  target: float  # the requested sparsity (N:M: 1 - n/m; quantisation: 0)
  prunable_sparsity: float
  total_sparsity: float
  metrics: dict[str, float]
  model: str = ""  # e.g. 'ResNet8', 'BERT-base': for the plot's title
  dataset: str = ""  # e.g. 'digits', 'cifar10'
  split: str = ""  # the evaluation split, e.g. 'test'
  bn_reestimated: bool = False
  pruner: str = "magnitude"  # a key of PRUNER_NAMES; 'none' for dense


class Subset:
  """A random-access view of some records of a source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


PRUNERS = ("magnitude", "obs", "sparsegpt")
# How tables and plots name a Result's pruner ('rtn': round-to-nearest
# quantisation, which prunes nothing).
PRUNER_NAMES = {
    "none": "dense",
    "magnitude": "magnitude",
    "obs": "OBS",
    "sparsegpt": "SparseGPT",
    "rtn": "RTN",
    "gptq": "GPTQ",
}
QUANTIZE_METHODS = ("rtn", "gptq")
# `config.oneshot` fields newer than some configs and workdirs: these values
# stand in where a config lacks them (magnitude only: the sweep as it was).
DEFAULTS = {
    "pruners": ("magnitude",),
    "quantizers": (),
    "quantize_methods": ("rtn",),
    "obs_gradients": 64,
    "obs_batch_size": 16,
    "obs_block_size": 128,
    "obs_damp": 1e-3,
    "sparsegpt_batches": 8,
    "sparsegpt_block_size": 128,
}


def _field(config: ml_collections.ConfigDict, name: str) -> Any:
  return config.oneshot[name] if name in config.oneshot else DEFAULTS[name]


def _positive_int(config: ml_collections.ConfigDict, name: str) -> int:
  value = _field(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise cli.ConfigTypeError(
        f"config.oneshot.{name} must be a positive int, got {value!r}"
    )
  if value < 1:
    raise cli.ConfigError(
        f"config.oneshot.{name} must be a positive int, got {value!r}"
    )
  return int(value)


def _positive_number(config: ml_collections.ConfigDict, name: str) -> float:
  value = _field(config, name)
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.integer, np.floating)
  ):
    raise cli.ConfigTypeError(
        f"config.oneshot.{name} must be a positive number, got {value!r}"
    )
  if not 0 < value < math.inf:
    raise cli.ConfigError(
        f"config.oneshot.{name} must be a positive number, got {value!r}"
    )
  return float(value)


@dataclasses.dataclass(frozen=True)
class Options:
  """The checked `config.oneshot` fields that choose and shape the sweep."""

  sparsities: tuple[float, ...]
  nm_patterns: tuple[tuple[int, int], ...]
  pruners: tuple[str, ...]
  quantizers: tuple[int, ...]
  quantize_methods: tuple[str, ...]
  obs_gradients: int
  obs_batch_size: int
  obs_block_size: int
  obs_damp: float
  sparsegpt_batches: int
  sparsegpt_block_size: int


def options(config: ml_collections.ConfigDict) -> Options:
  """Reads `config.oneshot`, with DEFAULTS for fields it lacks.

  Raises:
    cli.ConfigError (a ValueError; cli.ConfigTypeError, also a TypeError, for
    a wrong type) naming the field and its value, before anything is loaded.
  """
  pruners = _field(config, "pruners")
  if isinstance(pruners, str) or not isinstance(pruners, (list, tuple)):
    raise cli.ConfigTypeError(
        f"config.oneshot.pruners must be a tuple of names from {PRUNERS}, got "
        f"{pruners!r}"
    )
  for name in pruners:
    if name not in PRUNERS:
      raise cli.ConfigError(
          f"config.oneshot.pruners: {name!r} is not one of {PRUNERS}"
      )
  if len(set(pruners)) != len(pruners):
    raise cli.ConfigError(
        f"config.oneshot.pruners names a pruner twice: {tuple(pruners)!r}"
    )
  bits = _field(config, "quantizers")
  if isinstance(bits, (str, int)) or not isinstance(bits, (list, tuple)):
    raise cli.ConfigTypeError(
        f"config.oneshot.quantizers must be a tuple of bit widths (e.g. (8, 4)), "
        f"got {bits!r}"
    )
  for b in bits:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise cli.ConfigTypeError(
          f"config.oneshot.quantizers: {b!r} is not an int number of bits"
      )
    if not 2 <= b <= 16:
      raise cli.ConfigError(
          f"config.oneshot.quantizers: {b} bits is outside [2, 16]"
      )
  if len(set(bits)) != len(bits):
    raise cli.ConfigError(
        f"config.oneshot.quantizers names a width twice: {tuple(bits)!r}"
    )
  methods = _field(config, "quantize_methods")
  if isinstance(methods, str) or not isinstance(methods, (list, tuple)):
    raise cli.ConfigTypeError(
        f"config.oneshot.quantize_methods must be a tuple of names from "
        f"{QUANTIZE_METHODS}, got {methods!r}"
    )
  for name in methods:
    if name not in QUANTIZE_METHODS:
      raise cli.ConfigError(
          f"config.oneshot.quantize_methods: {name!r} is not one of "
          f"{QUANTIZE_METHODS}"
      )
  if len(set(methods)) != len(methods):
    raise cli.ConfigError(
        "config.oneshot.quantize_methods names a method twice: "
        f"{tuple(methods)!r}"
    )
  return Options(
      sparsities=tuple(float(s) for s in config.oneshot.sparsities),
      nm_patterns=tuple(
          (int(n), int(m)) for n, m in config.oneshot.nm_patterns
      ),
      pruners=tuple(pruners),
      quantizers=tuple(int(b) for b in bits),
      quantize_methods=tuple(methods),
      obs_gradients=_positive_int(config, "obs_gradients"),
      obs_batch_size=_positive_int(config, "obs_batch_size"),
      obs_block_size=_positive_int(config, "obs_block_size"),
      obs_damp=_positive_number(config, "obs_damp"),
      sparsegpt_batches=_positive_int(config, "sparsegpt_batches"),
      sparsegpt_block_size=_positive_int(config, "sparsegpt_block_size"),
  )


_COMPRESSORS: dict[Any, Any] = {}


def compressions(
    config: ml_collections.ConfigDict, task
) -> list[tuple[str, str, float, Any, dict[str, int]]]:
  """The magnitude sweep: (label, kind, target sparsity, compressor, its call kwargs).

  One compressor per kind serves every sparsity through ``level=i``, and compressors
  are shared between runs, so each kind compiles once per sweep.
  """
  sparsities = tuple(float(s) for s in config.oneshot.sparsities)
  patterns = tuple((int(n), int(m)) for n, m in config.oneshot.nm_patterns)
  cache_key = (sparsities, patterns, task.select, task.uniform_select)
  if cache_key not in _COMPRESSORS:
    _COMPRESSORS[cache_key] = (
        compress.global_magnitude(list(sparsities), select=task.select),
        compress.layerwise_magnitude(
            list(sparsities), select=task.uniform_select
        ),
        [
            compress.n_of_m(n, m, on_indivisible="skip", select=task.select)
            for n, m in patterns
        ],
    )
  global_all, uniform_all, nm = _COMPRESSORS[cache_key]
  out = []
  for kind, compressor in (("global", global_all), ("uniform", uniform_all)):
    for i, s in enumerate(sparsities):
      out.append(
          (f"{kind} {round(100 * s)}%", kind, s, compressor, {"level": i})
      )
  for (n, m), compressor in zip(patterns, nm):
    out.append((f"{n}:{m}", "n:m", 1 - n / m, compressor, {}))
  return out


def _quantizer(bits: int, task) -> Any:
  """`cram_jax.quantize(bits)` over the task's prunable leaves, shared by runs."""
  key = ("quantize", bits, task.select)
  if key not in _COMPRESSORS:
    _COMPRESSORS[key] = cram_jax.quantize(bits, select=task.select)
  return _COMPRESSORS[key]


def nm_select(select: compress.Selection, m: int):
  """`select`, less the leaves whose input axis (-2) is not a multiple of `m`.

  Magnitude N:M skips such leaves (`on_indivisible="skip"`: the digits stem
  conv has 1 input channel); OBS and SparseGPT get the same leaves this way.
  """

  def chosen(path: str, leaf: Any) -> bool:
    return bool(select(path, leaf)) and np.shape(leaf)[-2] % m == 0

  return chosen


@dataclasses.dataclass(frozen=True)
class Step:
  """One configuration of the sweep: `apply(params, calibration) -> (params, masks)`."""

  pruner: str
  label: str
  kind: str
  target: float
  apply: Callable[[Any, Calibration], tuple[Any, Any]]


def steps(config: ml_collections.ConfigDict, task) -> list[Step]:
  """Every compression of the sweep, in table order: pruner by pruner, then bits."""
  opts = options(config)
  out: list[Step] = []
  for pruner in opts.pruners:
    if pruner == "magnitude":
      for label, kind, target, compressor, kwargs in compressions(config, task):
        out.append(
            Step(
                "magnitude",
                label,
                kind,
                target,
                functools.partial(_magnitude, compressor, kwargs),
            )
        )
    elif pruner == "obs":
      for s in opts.sparsities:
        out.append(
            Step(
                "obs",
                f"global {round(100 * s)}%",
                "global",
                s,
                functools.partial(_obs, s, "global", task.select, opts),
            )
        )
      for n, m in opts.nm_patterns:
        out.append(
            Step(
                "obs",
                f"{n}:{m}",
                "n:m",
                1 - n / m,
                functools.partial(
                    _obs,
                    1 - n / m,
                    (n, m),
                    nm_select(task.select, m),
                    opts,
                ),
            )
        )
    else:  # sparsegpt: layer by layer, so 'uniform', as magnitude's layer-wise
      for s in opts.sparsities:
        out.append(
            Step(
                "sparsegpt",
                f"uniform {round(100 * s)}%",
                "uniform",
                s,
                functools.partial(
                    _sparsegpt,
                    s,
                    None,
                    task.uniform_select,
                    opts.sparsegpt_block_size,
                ),
            )
        )
      for n, m in opts.nm_patterns:
        out.append(
            Step(
                "sparsegpt",
                f"{n}:{m}",
                "n:m",
                1 - n / m,
                functools.partial(
                    _sparsegpt,
                    1 - n / m,
                    (n, m),
                    nm_select(task.select, m),
                    opts.sparsegpt_block_size,
                ),
            )
        )
  for method in opts.quantize_methods:
    for bits in opts.quantizers:
      if method == "rtn":
        apply = functools.partial(_magnitude, _quantizer(bits, task), {})
      else:
        apply = functools.partial(
            _gptq, bits, task.select, opts.sparsegpt_block_size
        )
      out.append(Step(method, f"int{bits}", "quantize", 0.0, apply))
  return out


def _magnitude(compressor, kwargs, params, calibration):
  del calibration  # data-free
  return cram_jax.prune(params, compressor, **kwargs)


def _obs(sparsity, pattern, select, opts, params, calibration):
  from cram_jax import obs  # pylint: disable=import-outside-toplevel

  return obs.obs_prune(
      params,
      calibration.fisher_gradients(),
      sparsity,
      pattern=pattern,
      block_size=opts.obs_block_size,
      damp=opts.obs_damp,
      select=select,
  )


def _sparsegpt(sparsity, nm, select, block_size, params, calibration):
  from cram_jax import sparsegpt  # pylint: disable=import-outside-toplevel

  return sparsegpt.sparsegpt_prune(
      params,
      calibration.hessians(),
      sparsity,
      nm=nm,
      block_size=block_size,
      select=select,
  )


def _gptq(bits, select, block_size, params, calibration):
  from cram_jax import sparsegpt  # pylint: disable=import-outside-toplevel

  return sparsegpt.gptq_quantize(
      params,
      calibration.hessians(),
      bits,
      block_size=block_size,
      select=select,
  )


def calibration_batches(
    run: train_lib.Run, batch_size: int, num_batches: int
) -> list[dict[str, Any]]:
  """`num_batches` batches drawn from the run's calibration images.

  The calibration images are 1000 (`config.oneshot.bn_images`) random training
  images, chosen with `config.seed`; batches carry the training augmentation.
  """
  config = run.config
  source = data_lib.open_source(
      config.dataset, config.train_split, data_dir=config.data_dir
  )
  rng = np.random.default_rng(config.seed)
  chosen = rng.choice(
      len(source),
      size=min(config.oneshot.bn_images, len(source)),
      replace=False,
  )
  iterator = data_lib.make_pipeline(
      config.dataset,
      config.train_split,
      source=Subset(source, chosen),
      batch_size=min(batch_size, len(chosen)),
      train=True,
      seed=config.seed,
      **dict(config.data_options),
  )
  return [
      train_lib.device_keys(run.task, next(iterator))
      for _ in range(num_batches)
  ]


def calibration_images(run: train_lib.Run) -> list[Any]:
  """docs/method.md section 5: batches from 1000 random training images, training augmentation."""
  config = run.config
  return [
      run.task.model_inputs(batch)
      for batch in calibration_batches(
          run, config.oneshot.bn_batch_size, config.oneshot.bn_batches
      )
  ]


class Calibration:
  """What the data-aware pruners of one run need, computed on first use.

  Fisher gradients (OBS) and layer Hessians (SparseGPT) are computed once per
  run and shared by every sparsity; each is logged with its time.
  """

  def __init__(
      self,
      run: train_lib.Run,
      variables: dict[str, Any],
      opts: Options,
      log: Callable[[str], None],
      method: str,
  ):
    self.run, self.variables, self.opts = run, variables, opts
    self.log, self.method = log, method
    self._grads = self._hessians = None

  def fisher_gradients(self) -> Any:
    """`obs_gradients` gradients of the eval-mode loss, one per calibration batch."""
    if self._grads is None:
      from cram_jax import obs  # pylint: disable=import-outside-toplevel

      tick = time.perf_counter()
      task, opts = self.run.task, self.opts
      batches = calibration_batches(
          self.run, opts.obs_batch_size, opts.obs_gradients
      )
      others = {k: v for k, v in self.variables.items() if k != "params"}

      # Eval mode: the loss of the network as it is evaluated (BatchNorm with
      # its running statistics, no dropout), per batch.
      def loss_fn(params, batch):
        outputs = task.model.apply(
            {**others, "params": params},
            *task.model_inputs(batch),
            train=False,
        )
        return task.loss_and_metrics(outputs, batch)[0]

      self._grads = obs.fisher_gradients(
          loss_fn, self.variables["params"], batches
      )
      self.log(
          f"{self.method}: Fisher from {len(batches)} gradients of batches of "
          f"{opts.obs_batch_size} training images for OBS "
          f"({time.perf_counter() - tick:.1f} s)"
      )
    return self._grads

  def hessians(self) -> Any:
    """SparseGPT's (and GPTQ's) layer Hessians from `sparsegpt_batches` calibration batches."""
    if self._hessians is None:
      from cram_jax import sparsegpt  # pylint: disable=import-outside-toplevel

      tick = time.perf_counter()
      config, task = self.run.config, self.run.task
      inputs = [
          task.model_inputs(batch)
          for batch in calibration_batches(
              self.run,
              config.oneshot.bn_batch_size,
              self.opts.sparsegpt_batches,
          )
      ]
      self._hessians = sparsegpt.layer_hessians(
          task.model.apply,
          self.variables,
          inputs,
          select=task.select,
          train=False,
      )
      self.log(
          f"{self.method}: layer Hessians from {len(inputs)} batches of "
          f"training images for SparseGPT/GPTQ ({time.perf_counter() - tick:.1f} s)"
      )
    return self._hessians


def model_and_dataset(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """What a reader calls the run's model and data, e.g. ('ResNet8', 'digits')."""
  if config.task == "squad":
    return f"BERT-{config.bert.size}", config.dataset
  return config.model, config.dataset


def _print(line: str) -> None:
  print(line, flush=True)


def read_config(
    workdir: str, override: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """A run's config.json with `config.oneshot` fields replaced by `override`.

  Raises:
    cli.ConfigError: (a ValueError) for a bad `config.oneshot` field, naming it.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.parallel = (
      "jit"  # evaluation is the same either way; BN re-estimation needs no axis
  )
  config.cram.local_perturbation = False  # a pmap-only training option
  set_fields(config, override or {})
  options(config)
  return config


def set_fields(
    config: ml_collections.ConfigDict, fields: dict[str, Any]
) -> None:
  """Sets `config.oneshot` fields; a name it does not know is an error.

  Raises:
    cli.ConfigError: (a ValueError) for an unknown field;
      cli.ConfigTypeError (a TypeError) for a value the field's type refuses.
  """
  for key, value in fields.items():
    if key not in config.oneshot and key not in DEFAULTS:
      known = sorted({*config.oneshot.keys(), *DEFAULTS})
      raise cli.ConfigError(
          f"config.oneshot has no field {key!r} (fields: {', '.join(known)})"
      )
    try:
      config.oneshot[key] = value
    except TypeError as e:
      raise cli.ConfigTypeError(
          f"config.oneshot.{key}={value!r}: {e}"
      ) from None


def sweep(
    workdir: str,
    *,
    override: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = _print,
) -> list[Result]:
  """Evaluates one trained run under every compression of its `config.oneshot`.

  Args:
    workdir: a training run's directory (its `config.json` and checkpoints).
    override: `config.oneshot` fields to replace, e.g. `{"bn_batches": 10}`
      or `{"pruners": ("magnitude", "obs"), "quantizers": (8, 4)}`.
    log: called with one line per evaluated configuration, as it finishes
      (e.g. `sgd [3/13] global 70%: accuracy 98.89% (BN re-estimated, 2.1 s)`);
      None for silence.

  Raises:
    cli.ConfigError: (a ValueError) for a bad `config.oneshot` field, before
      the run is loaded.
  """
  log = log or (lambda line: None)
  config = read_config(workdir, override)
  opts = options(config)
  start = time.perf_counter()
  run, state = train_lib.load_final(workdir, config)
  method = train_lib.method_label(config)
  model, dataset = model_and_dataset(config)
  metric = run.task.metric
  eval_fn = run.parallel.compile_eval(run.task.eval_outputs)
  variables = train_lib.variables_of(state)
  sweep_list = steps(config, run.task)
  calibration = Calibration(run, variables, opts, log, method)
  several = opts.pruners != ("magnitude",) or bool(opts.quantizers)
  total = len(sweep_list) + 1  # and dense
  log(
      f"{method}: {model} on {dataset} from {workdir} (step "
      f"{int(state['step'])}), {total} configurations"
  )

  def evaluate(variables):
    return train_lib.evaluate(run, eval_fn, run.parallel.place_state(variables))

  def finish(step, report, metrics, note, seconds):
    results.append(
        Result(
            method,
            step.label,
            step.kind,
            step.target,
            report.prunable_sparsity,
            report.total_sparsity,
            metrics,
            model,
            dataset,
            split=config.eval_split,
            bn_reestimated=bool(note),
            pruner=step.pruner,
        )
    )
    label = column_label(results[-1]) if several else step.label
    log(
        f"{method} [{len(results)}/{total}] {label}: {metric} "
        f"{100 * metrics.get(metric, math.nan):.2f}% ({note}{seconds:.1f} s)"
    )

  results: list[Result] = []
  dense = cram_jax.sparsity_report(variables["params"], select=run.task.select)
  finish(
      Step("none", "dense", "dense", 0.0, None),
      dense,
      evaluate(variables),
      "",
      time.perf_counter() - start,
  )
  bn_inputs = None
  if run.task.has_batch_stats:
    tick = time.perf_counter()
    bn_inputs = calibration_images(run)
    log(
        f"{method}: {len(bn_inputs)} batches of training images for BatchNorm "
        f"re-estimation ({time.perf_counter() - tick:.1f} s)"
    )
  note = "BN re-estimated, " if bn_inputs is not None else ""
  for step in sweep_list:
    tick = time.perf_counter()
    pruned, masks = step.apply(variables["params"], calibration)
    report = cram_jax.sparsity_report(pruned, masks)
    candidate = {**variables, "params": pruned}
    if bn_inputs is not None:
      candidate = cram_jax.recalibrate_batch_stats(
          run.task.model, candidate, bn_inputs
      )
    metrics = evaluate(candidate)
    finish(step, report, metrics, note, time.perf_counter() - tick)
  return results


def column_label(result: Result) -> str:
  """'OBS global 90%', 'SparseGPT 2:4', 'RTN int8'; 'dense' for dense."""
  if result.pruner == "none":
    return result.compression
  return f"{PRUNER_NAMES[result.pruner]} {result.compression}"


def _columns(results: Sequence[Result]) -> list[tuple[tuple[str, str], str]]:
  """The table's columns, in order: ((pruner, compression), header).

  Magnitude pruning alone keeps its plain labels ('global 90%'), so the
  demo's table reads as it always has; otherwise each header names its pruner.
  """
  keys = list(dict.fromkeys((r.pruner, r.compression) for r in results))
  plain = {p for p, _ in keys} <= {"none", "magnitude"}
  by_key = {(r.pruner, r.compression): r for r in results}
  return [(key, key[1] if plain else column_label(by_key[key])) for key in keys]


def markdown_table(results: Sequence[Result], metric: str) -> str:
  """Rows: training methods; columns: the compressions (see `_columns`)."""
  columns = _columns(results)
  methods = list(dict.fromkeys(r.method for r in results))
  value = {
      (r.method, r.pruner, r.compression): r.metrics.get(metric, float("nan"))
      for r in results
  }
  lines = [
      "| method | " + " | ".join(header for _, header in columns) + " |",
      "|---|" + "---:|" * len(columns),
  ]
  for m in methods:
    lines.append(
        f"| {m} | "
        + " | ".join(
            f"{100 * value.get((m, *key), math.nan):.2f}" for key, _ in columns
        )
        + " |"
    )
  return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str) -> None:
  names = sorted({k for r in results for k in r.metrics})
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        [
            "method",
            "pruner",
            "compression",
            "kind",
            "target_sparsity",
            "prunable_sparsity",
            "total_sparsity",
            *names,
        ]
    )
    for r in results:
      writer.writerow(
          [
              r.method,
              r.pruner,
              r.compression,
              r.kind,
              r.target,
              f"{r.prunable_sparsity:.6f}",
              f"{r.total_sparsity:.6f}",
              *(r.metrics.get(n, "") for n in names),
          ]
      )


KIND_NAMES = {"global": "global", "uniform": "layer-wise"}


def _title(results: Sequence[Result]) -> str:
  """'ResNet8 on digits'; several models or data sets are listed."""
  models = ", ".join(dict.fromkeys(r.model for r in results if r.model))
  datasets = ", ".join(dict.fromkeys(r.dataset for r in results if r.dataset))
  if models and datasets:
    return f"{models} on {datasets}"
  return models or datasets


def only_magnitude(results: Sequence[Result]) -> bool:
  """Whether `results` hold magnitude pruning alone (the demo's sweep)."""
  return {r.pruner for r in results} <= {"none", "magnitude"}


def plot(results: Sequence[Result], metric: str, path: str) -> None:
  """The magnitude-only layout (`plot_magnitude`), else `plot_by_pruner`."""
  if only_magnitude(results):
    plot_magnitude(results, metric, path)
  else:
    plot_by_pruner(results, metric, path)


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def plot_by_pruner(results: Sequence[Result], metric: str, path: str) -> None:
  """One panel per pruner and a last panel of N:M and quantisation; one colour per method.

  Pruner panels: the metric against the measured sparsity of the prunable
  weights, global (solid, circles) and layer-wise (dashed, squares), each
  method's unpruned model as a dotted line. Last panel: one column per N:M
  pattern and pruner and per bit width, a marker per method (spread sideways so
  that equal values stay visible).
  """
  plt = _plt()
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  methods = list(dict.fromkeys(r.method for r in results))
  colors = dict(
      zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
  )
  pruners = [
      p
      for p in dict.fromkeys(r.pruner for r in results)
      if any(r.pruner == p and r.kind in ("global", "uniform") for r in results)
  ]
  fixed = [
      (key, header)
      for key, header in _columns(results)
      if any(
          (r.pruner, r.compression) == key and r.kind in ("n:m", "quantize")
          for r in results
      )
  ]
  panels = len(pruners) + bool(fixed)
  fig, axes = plt.subplots(
      1,
      panels,
      figsize=(3.6 * panels + 0.6, 4.8),
      dpi=120,
      sharey=True,
      squeeze=False,
  )

  def value(r):
    return 100 * r.metrics.get(metric, math.nan)

  dense = {r.method: value(r) for r in results if r.kind == "dense"}
  styles = {"global": ("-", "o"), "uniform": ("--", "s")}
  for ax, pruner in zip(axes[0], pruners):
    xs = []
    kinds = []
    for m in methods:
      if m in dense:
        ax.axhline(dense[m], color=colors[m], linestyle=":", linewidth=1.0)
      for kind, (line, marker) in styles.items():
        rows = sorted(
            (
                r
                for r in results
                if r.method == m and r.pruner == pruner and r.kind == kind
            ),
            key=lambda r: r.target,
        )
        if not rows:
          continue
        kinds.append(kind)
        # The requested sparsity, as in the table: layer-wise rows leave the
        # stem and classifier dense, so their measured sparsity over the
        # global selection differs per run and would scatter the ticks.
        xs += [100 * r.target for r in rows]
        ax.plot(
            [100 * r.target for r in rows],
            [value(r) for r in rows],
            linestyle=line,
            marker=marker,
            color=colors[m],
            markersize=4,
        )
    ticks = sorted({round(x) for x in xs})
    ax.set_xticks(ticks, [f"{t}%" for t in ticks], fontsize=8)
    ax.set_xlabel("requested sparsity (of the pruner's selection)", fontsize=9)
    what = " + ".join(
        KIND_NAMES[k]
        for k in dict.fromkeys(sorted(kinds, key=list(styles).index))
    )
    ax.set_title(f"{PRUNER_NAMES[pruner]} ({what})", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel(f"{metric} (%)")
  if fixed:
    ax = axes[0, -1]
    spread = 0.6 / max(len(methods) - 1, 1)
    for j, m in enumerate(methods):
      offset = (j - (len(methods) - 1) / 2) * spread
      for i, (key, _) in enumerate(fixed):
        rows = [
            r
            for r in results
            if r.method == m and (r.pruner, r.compression) == key
        ]
        if rows:
          ax.plot(
              i + offset,
              value(rows[0]),
              marker="D",
              color=colors[m],
              markersize=5,
              linestyle="none",
          )
    for i in range(1, len(fixed)):
      ax.axvline(i - 0.5, color="0.85", linewidth=0.8)
    ax.set_xticks(
        range(len(fixed)),
        [header.replace(" ", "\n", 1) for _, header in fixed],
        fontsize=8,
    )
    ax.set_xlim(-0.5, len(fixed) - 0.5)
    ax.set_title("N:M and quantisation", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
  lows = [value(r) for r in results if math.isfinite(value(r))]
  if lows:
    axes[0, 0].set_ylim(max(0.0, min(lows) - 5), min(102.0, max(lows) + 3))
  splits = "/".join(dict.fromkeys(r.split for r in results if r.split))
  what = _title(results)
  fig.suptitle(
      "One-shot compression without retraining"
      + (f": {what}" if what else "")
      + f"\n{metric} on the {splits or 'evaluation'} split"
      + (
          ", BatchNorm re-estimated after each compression"
          if any(r.bn_reestimated for r in results)
          else ""
      ),
      fontsize=11,
  )
  handles = [
      Line2D(
          [],
          [],
          color=colors[m],
          marker="o",
          linestyle="-",
          label=m if m not in dense else f"{m} (dense {dense[m]:.1f}%)",
      )
      for m in methods
  ]
  styles_shown = [
      Line2D([], [], color="0.3", linestyle="-", marker="o", label="global"),
      Line2D(
          [], [], color="0.3", linestyle="--", marker="s", label="layer-wise"
      ),
      Line2D([], [], color="0.3", linestyle=":", label="dense (unpruned)"),
  ]
  per_row = 4
  rows = [handles[i : i + per_row] for i in range(0, len(handles), per_row)]
  rows.append(styles_shown)
  height = 0.045
  for k, row in enumerate(rows):
    fig.legend(
        handles=row,
        loc="lower center",
        bbox_to_anchor=(0.5, height * (len(rows) - 1 - k)),
        ncol=len(row),
        fontsize=8,
        frameon=False,
    )
  fig.tight_layout(rect=(0, height * len(rows) + 0.01, 1, 1))
  fig.savefig(path)
  plt.close(fig)


def plot_magnitude(results: Sequence[Result], metric: str, path: str) -> None:
  """Two panels sharing the metric axis, one colour per method.

  Left: the metric against the measured sparsity of the prunable weights, global
  (solid) and layer-wise (dashed) magnitude pruning, the unpruned model as a
  dotted line. Right: N:M patterns as bars grouped by method, values printed.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  methods = list(dict.fromkeys(r.method for r in results))
  colors = dict(
      zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
  )
  patterns = list(
      dict.fromkeys(r.compression for r in results if r.kind == "n:m")
  )
  has_nm = bool(patterns)
  fig, axes = plt.subplots(
      1,
      2 if has_nm else 1,
      figsize=(10, 4.6) if has_nm else (7, 4.6),
      dpi=120,
      sharey=True,
      squeeze=False,
      gridspec_kw={"width_ratios": [2.2, 1]} if has_nm else None,
  )
  ax = axes[0, 0]

  def value(r):
    return 100 * r.metrics.get(metric, math.nan)

  def dense_value(m):
    rows = [r for r in results if r.method == m and r.kind == "dense"]
    return value(rows[0]) if rows else None

  # Left: unstructured sparsity.
  styles = {"global": ("-", "o"), "uniform": ("--", "s")}
  xs = []
  for m in methods:
    dense = dense_value(m)
    if dense is not None:
      ax.axhline(dense, color=colors[m], linestyle=":", linewidth=1.2)
    for kind, (line, marker) in styles.items():
      rows = sorted(
          (r for r in results if r.method == m and r.kind == kind),
          key=lambda r: r.prunable_sparsity,
      )
      xs += [100 * r.prunable_sparsity for r in rows]
      ax.plot(
          [100 * r.prunable_sparsity for r in rows],
          [value(r) for r in rows],
          linestyle=line,
          marker=marker,
          color=colors[m],
          markersize=5,
      )
  if xs:
    ticks = sorted({round(x) for x in xs})
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    pad = 0.03 * max(max(xs) - min(xs), 1.0)
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
  ax.set_xlabel("sparsity of the prunable weights (magnitude pruning)")
  ax.set_ylabel(f"{metric} (%)")
  ax.set_title("unstructured", fontsize=10)
  ax.grid(alpha=0.3)

  def method_label(m):
    dense = dense_value(m)
    return m if dense is None else f"{m} (dense {dense:.1f}%)"

  handles = [Patch(color=colors[m], label=method_label(m)) for m in methods] + [
      Line2D([], [], color="0.3", linestyle="-", marker="o", label="global"),
      Line2D(
          [],
          [],
          color="0.3",
          linestyle="--",
          marker="s",
          label="layer-wise (uniform)",
      ),
      Line2D([], [], color="0.3", linestyle=":", label="dense (unpruned)"),
  ]

  # Right: N:M, one group of bars per method.
  if has_nm:
    bx = axes[0, 1]
    width = 0.8 / len(patterns)
    hatches = ["", "//", "xx", ".."]
    for i, m in enumerate(methods):
      for j, pattern in enumerate(patterns):
        rows = [
            r for r in results if r.method == m and r.compression == pattern
        ]
        if not rows:
          continue
        x = i + (j - (len(patterns) - 1) / 2) * width
        height = value(rows[0])
        bx.bar(
            x,
            height,
            width * 0.92,
            color=colors[m],
            hatch=hatches[j % len(hatches)],
            edgecolor="white",
        )
        # The value inside the bar's top: bars of 97 and 99 look alike.
        bx.text(
            x,
            height - 2,
            f"{height:.1f}",
            rotation=90,
            ha="center",
            va="top",
            color="white",
            fontsize=8,
            fontweight="bold",
            bbox={"facecolor": colors[m], "edgecolor": "none", "pad": 1},
        )
      dense = dense_value(m)
      if dense is not None:
        bx.hlines(
            dense,
            i - 0.45,
            i + 0.45,
            colors=colors[m],
            linestyles=":",
            linewidth=1.2,
        )
    bx.set_xticks(range(len(methods)), methods)
    bx.set_title("N:M (n of every m inputs kept)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    handles += [
        Patch(
            facecolor="0.6",
            edgecolor="white",
            hatch=hatches[j % len(hatches)],
            label=pattern,
        )
        for j, pattern in enumerate(patterns)
    ]
  lows = [value(r) for r in results if math.isfinite(value(r))]
  if lows:
    ax.set_ylim(max(0.0, min(lows) - 8), min(105.0, max(lows) + 5))
  what = _title(results)
  splits = "/".join(dict.fromkeys(r.split for r in results if r.split))
  splits = splits or "evaluation"
  fig.suptitle(
      "One-shot pruning without retraining"
      + (f": {what}" if what else "")
      + f"\n{metric} on the {splits} split"
      + (
          ", BatchNorm re-estimated after pruning"
          if any(r.bn_reestimated for r in results)
          else ""
      ),
      fontsize=11,
  )
  # Two rows under the panels: the methods, then what lines and bars mean.
  rows = (handles[: len(methods)], handles[len(methods) :])
  for y, row in zip((0.055, 0.0), rows):
    fig.legend(
        handles=row,
        loc="lower center",
        bbox_to_anchor=(0.5, y),
        ncol=len(row),
        fontsize=8,
        frameon=False,
    )
  fig.tight_layout(rect=(0, 0.11, 1, 1))
  fig.savefig(path)
  plt.close(fig)


def write_outputs(
    results: Sequence[Result],
    metric: str,
    out: str,
    *,
    name: str = "oneshot",
    heading: str | None = None,
) -> dict[str, str]:
  """Writes `<name>.md` (the table), `<name>.csv` and `<name>.png` to `out`.

  `heading` is the table file's first line (default: "<metric> (%) after
  one-shot pruning").
  """
  os.makedirs(out, exist_ok=True)
  paths = {
      "table": os.path.join(out, f"{name}.md"),
      "csv": os.path.join(out, f"{name}.csv"),
      "plot": os.path.join(out, f"{name}.png"),
  }
  table = markdown_table(results, metric)
  heading = heading or f"{metric} (%) after one-shot pruning"
  with open(paths["table"], "w") as f:
    f.write(f"{heading}\n\n{table}\n")
  write_csv(results, paths["csv"])
  plot(results, metric, paths["plot"])
  return paths


def _check_workdir(workdir: str) -> None:
  """A workdir must hold a finished or checkpointed training run."""
  if not os.path.isdir(workdir):
    raise cli.UsageError(f"--workdir {workdir}: no such directory")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise cli.UsageError(
        f"--workdir {workdir}: no config.json there; is it a train.py workdir?"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workdir",
      action="append",
      required=True,
      help="a training run's directory; repeat for several methods",
  )
  parser.add_argument(
      "--out", required=True, help="where the table, CSV and plot go"
  )
  parser.add_argument("--sparsities", type=float, nargs="*", default=None)
  parser.add_argument("--bn-batches", type=int, default=None)
  parser.add_argument(
      "--pruners",
      nargs="+",
      default=None,
      help=f"one-shot pruners, of {', '.join(PRUNERS)} (default: the config's)",
  )
  parser.add_argument(
      "--quantizers",
      type=int,
      nargs="*",
      default=None,
      help="bit widths of round-to-nearest quantisation, e.g. 8 4",
  )
  parser.add_argument(
      "-v",
      "--verbose",
      action="store_true",
      help="keep absl/orbax INFO logging (WARNING by default)",
  )
  args = parser.parse_args(argv)
  cli.quiet_logging(verbosity_set=args.verbose)
  with cli.exit_on_usage_error("oneshot.py"):
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, str]:
  override = {}
  if args.sparsities is not None:
    for s in args.sparsities:
      if not 0.0 <= s < 1.0:
        raise cli.UsageError(f"--sparsities: {s} is not a sparsity in [0, 1)")
    override["sparsities"] = tuple(args.sparsities)
  if args.bn_batches is not None:
    if args.bn_batches < 1:
      raise cli.UsageError(
          f"--bn-batches must be a positive int, got {args.bn_batches}"
      )
    override["bn_batches"] = args.bn_batches
  if args.pruners is not None:
    override["pruners"] = tuple(args.pruners)
  if args.quantizers is not None:
    override["quantizers"] = tuple(args.quantizers)
  for workdir in args.workdir:
    _check_workdir(workdir)
  for workdir in args.workdir:  # every config checked before any run loads
    read_config(workdir, override)
  results: list[Result] = []
  metric = None
  for workdir in args.workdir:
    rows = sweep(workdir, override=override)
    results.extend(rows)
    with open(os.path.join(workdir, "config.json")) as f:
      task = json.load(f)["task"]
    metric = metric or {"vision": "accuracy", "squad": "f1"}[task]
  paths = write_outputs(results, metric, args.out)
  print(
      f"\n{metric} (%) after one-shot pruning (BatchNorm re-estimated where present):\n"
  )
  print(markdown_table(results, metric))
  print(f"\nwritten: {paths['table']}, {paths['csv']}, {paths['plot']}")
  return paths


if __name__ == "__main__":
  main()
