"""experiments/compare.py end to end, tiny: two methods, two sparsities, every pruner.

Trains SGD and CrAM+-Multi for a few steps on the bundled digits, runs the sweep
(magnitude, OBS, SparseGPT at 50/90% and 2:4; RTN and GPTQ at int8/int4), and
checks the table's structure, that BatchNorm is re-estimated after every
compression, what each compressed tree really holds (2:4 groups, kept counts,
quantisation grids), counted on the arrays, and that a second run writes the
same table and CSV. Nothing is downloaded: digits come from scikit-learn.
"""

from __future__ import annotations

import csv
import re

import compile_cache
import jax
import numpy as np
import pytest

import cram_jax
from cram_jax import models
from cram_jax.compress.select import path_str
from experiments import compare, oneshot
from experiments.configs import digits

METHODS = ("sgd", "cram+-multi")
SPARSITIES = (0.5, 0.9)
BITS = (8, 4)
CONFIG = {
    "num_train_steps": 3,
    "num_epochs": 1,
    "checkpoint_every_steps": 3,
    "log_every_steps": 3,
    "progress": False,
}
ONESHOT = {
    "sparsities": SPARSITIES,
    "bn_images": 64,
    "bn_batches": 2,
    "bn_batch_size": 16,
    "obs_gradients": 8,
    "obs_batch_size": 8,
    "obs_block_size": 64,
    "sparsegpt_batches": 2,
    "sparsegpt_block_size": 64,
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_for_this_module(tmp_path_factory):
  """A persistent compilation cache: the second run compiles nothing new."""
  with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache")):
    yield


def expected_columns():
  """The table's headers, written out from the sweep's definition."""
  pct = [f"{round(100 * s)}%" for s in SPARSITIES]
  return (
      ["dense"]
      + [f"magnitude global {p}" for p in pct]
      + [f"magnitude uniform {p}" for p in pct]
      + ["magnitude 2:4"]
      + [f"OBS global {p}" for p in pct]
      + ["OBS 2:4"]
      + [f"SparseGPT uniform {p}" for p in pct]
      + ["SparseGPT 2:4"]
      + [f"{q} int{b}" for q in ("RTN", "GPTQ") for b in BITS]
  )


def run_compare(out, data_dir, monkeypatch, methods=METHODS):
  """compare.compare on the tiny settings; returns (paths, lines, spies)."""
  recalibrated, reported = [], []
  recalibrate = cram_jax.recalibrate_batch_stats
  report = cram_jax.sparsity_report

  def spy_recalibrate(model, variables, batches, **kwargs):
    new = recalibrate(model, variables, batches, **kwargs)
    recalibrated.append(
        (jax.device_get(variables["batch_stats"]), jax.device_get(new))
    )
    return new

  def spy_report(params, masks=None, **kwargs):
    reported.append((jax.device_get(params), jax.device_get(masks)))
    return report(params, masks, **kwargs)

  monkeypatch.setattr(cram_jax, "recalibrate_batch_stats", spy_recalibrate)
  monkeypatch.setattr(cram_jax, "sparsity_report", spy_report)
  lines = []
  paths = compare.compare(
      str(out),
      methods=methods,
      config_override={**CONFIG, "data_dir": str(data_dir)},
      oneshot_override=ONESHOT,
      log=lines.append,
  )
  monkeypatch.undo()
  return paths, lines, recalibrated, reported


def read(path):
  with open(path, "rb") as f:
    return f.read()


def leaves_with_masks(params, masks):
  """[(path, leaf, mask)] of the leaves a compression touched (mask not None)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mask_leaves = jax.tree.leaves(masks, is_leaf=lambda x: x is None)
  return [
      (path_str(p), np.asarray(x), m)
      for (p, x), m in zip(flat, mask_leaves)
      if m is not None
  ]


def selected(params, select):
  return {
      path_str(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
      if select(path_str(p), x)
  }


def check_two_of_four(pruned, masks):
  """Every prunable kernel with inputs (axis -2) in fours keeps exactly 2 of 4."""
  touched = {name: (x, m) for name, x, m in leaves_with_masks(pruned, masks)}
  want = {
      name
      for name, x in selected(pruned, models.RESNET_PRUNABLE).items()
      if x.shape[-2] % 4 == 0
  }
  assert want and want <= set(touched), (want, set(touched))
  for name in want:
    leaf, mask = touched[name]
    mask = np.asarray(mask)
    assert not leaf[~mask].any(), name  # pruned weights are exactly zero
    groups = np.moveaxis(mask, -2, -1)
    groups = groups.reshape(groups.shape[:-1] + (groups.shape[-1] // 4, 4))
    assert (groups.sum(-1) == 2).all(), name


def check_grid(dense, quantised, masks, bits):
  """Quantised kernels sit on the symmetric per-output-channel grid of the dense
  kernel's peak, with at most 2**bits - 1 distinct values per channel."""
  levels = 2 ** (bits - 1) - 1
  touched = leaves_with_masks(quantised, masks)
  names = {name for name, _, _ in touched}
  assert names == set(selected(dense, models.RESNET_PRUNABLE)), names
  originals = selected(dense, models.RESNET_PRUNABLE)
  for name, leaf, _ in touched:
    channels = leaf.reshape(-1, leaf.shape[-1])
    peak = np.abs(originals[name].reshape(-1, leaf.shape[-1])).max(0)
    steps = channels / (peak / levels)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3, err_msg=name)
    assert np.abs(np.round(steps)).max() <= levels, name
    for c in range(channels.shape[1]):
      assert len(np.unique(channels[:, c])) <= 2**bits - 1, (name, c)


def test_compare_tiny_end_to_end_and_deterministic(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  first, lines, recalibrated, reported = run_compare(
      tmp_path / "a", data_dir, monkeypatch
  )
  columns = expected_columns()
  assert first == {
      "table": str(tmp_path / "a" / "compare.md"),
      "csv": str(tmp_path / "a" / "compare.csv"),
      "plot": str(tmp_path / "a" / "compare.png"),
  }

  # The table: one row per method, one column per pruner and compression.
  text = read(first["table"]).decode()
  rows = [line for line in text.splitlines() if line.startswith("|")]
  assert len(rows) == 2 + len(METHODS)
  assert [c.strip() for c in rows[0].strip("|").split("|")] == [
      "method",
      *columns,
  ]
  assert re.fullmatch(rf"\|(\s*:?-+:?\s*\|){{{len(columns) + 1}}}", rows[1])
  with open(first["csv"], newline="") as f:
    records = list(csv.DictReader(f))
  assert len(records) == len(METHODS) * len(columns)
  for method, row in zip(METHODS, rows[2:]):
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == method
    mine = [r for r in records if r["method"] == method]
    assert [
        oneshot.column_label(
            oneshot.Result(
                r["method"],
                r["compression"],
                r["kind"],
                0,
                0,
                0,
                {},
                pruner=r["pruner"],
            )
        )
        for r in mine
    ] == columns
    for cell, record in zip(cells[1:], mine):
      assert 0.0 <= float(record["accuracy"]) <= 1.0
      assert float(cell) == pytest.approx(
          100 * float(record["accuracy"]), abs=0.006
      )
  assert sum("configurations" in line for line in lines) == len(METHODS)

  # BatchNorm re-estimated after every compression (never for dense), and
  # re-estimation moved the statistics.
  compressions = len(METHODS) * (len(columns) - 1)
  assert len(recalibrated) == compressions
  for before, after in recalibrated:
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b), before, after["batch_stats"]
    )
    assert any(jax.tree.leaves(moved))

  # What each compression left in the parameters, in CSV order; sparsity_report
  # saw every tree (dense: once per method, with its selection, no masks).
  assert len(reported) == len(records)
  dense = None
  for record, (params, masks) in zip(records, reported):
    kind, target = record["kind"], float(record["target_sparsity"])
    if kind == "dense":
      dense = params
      assert masks is None
      continue
    touched = leaves_with_masks(params, masks)
    if kind == "n:m":
      check_two_of_four(params, masks)
    elif kind == "quantize":
      check_grid(dense, params, masks, int(record["compression"][3:]))
    elif kind == "global":
      size = sum(x.size for _, x, _ in touched)
      kept = sum(np.count_nonzero(x) for _, x, _ in touched)
      assert size == sum(
          x.size for x in selected(dense, models.RESNET_PRUNABLE).values()
      )
      assert kept <= round((1 - target) * size)
      assert kept == pytest.approx((1 - target) * size, abs=0.01 * size)
    else:  # uniform: each layer keeps its share, stem and classifier dense
      assert {n for n, _, _ in touched} == set(
          selected(dense, models.RESNET_UNIFORM)
      ), record
      for name, x, mask in touched:
        assert int(np.sum(mask)) == round((1 - target) * x.size), name
        assert not x[~np.asarray(mask)].any(), name
    assert float(record["prunable_sparsity"]) >= 0.0

  # Deterministic: a second run (same seeds) of the CrAM method alone writes
  # the same table header and row, and the same CSV lines. (One method halves
  # this test's second run; SGD goes through the same pipeline but for the
  # optimiser.)
  method = METHODS[-1]
  second, _, _, _ = run_compare(
      tmp_path / "b", data_dir, monkeypatch, methods=(method,)
  )

  def table_of(paths):
    lines = read(paths["table"]).decode().splitlines()
    rows = [line for line in lines if line.startswith("|")]
    return rows[:2] + [r for r in rows[2:] if r.split("|")[1].strip() == method]

  def csv_of(paths):
    lines = read(paths["csv"]).decode().splitlines()
    return lines[:1] + [
        line for line in lines[1:] if f",{method}," in f",{line}"
    ]

  assert len(table_of(first)) == 3 and len(csv_of(first)) == 1 + len(columns)
  assert table_of(second) == table_of(first)
  assert csv_of(second) == csv_of(first)
  png = read(second["plot"])
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_bad_oneshot_fields_fail_before_training(tmp_path):
  for fields, message in (
      ({"pruners": ("magnitude", "obd")}, "'obd' is not one of"),
      ({"pruners": "obs"}, "config.oneshot.pruners='obs'"),
      ({"quantizers": (8, 1)}, "1 bits is outside [2, 16]"),
      ({"quantizers": 8}, "config.oneshot.quantizers=8"),
      ({"quantize_methods": ("awq",)}, "'awq' is not one of"),
      ({"obs_gradients": 0}, "obs_gradients must be a positive int, got 0"),
      ({"sparsegpt_batches": 2.5}, "config.oneshot.sparsegpt_batches=2.5"),
      ({"quantizers": (8, 8)}, "names a width twice: (8, 8)"),
      ({"obs_damp": -1.0}, "obs_damp must be a positive number, got -1.0"),
      ({"prunrs": ("obs",)}, "config.oneshot has no field 'prunrs'"),
  ):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
      compare.compare(
          str(tmp_path / "never"), methods=("sgd",), oneshot_override=fields
      )
    assert not (tmp_path / "never").exists()
  with pytest.raises(ValueError, match="method 'adam' is not one of"):
    compare.compare(str(tmp_path / "never"), methods=("adam",))


def test_command_line_mistakes_are_one_line_with_exit_code_2(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = digits.get_config("sgd")
  (workdir / "config.json").write_text(config.to_json_best_effort())
  for argv, message in (
      (
          ["--pruners", "magnitude", "obd"],
          "config.oneshot.pruners: 'obd' is not one of",
      ),
      (["--quantizers", "1"], "config.oneshot.quantizers: 1 bits is outside"),
  ):
    with pytest.raises(SystemExit) as exit_info:
      oneshot.main(
          ["--workdir", str(workdir), "--out", str(tmp_path / "o"), *argv]
      )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("oneshot.py: error: ") and message in err, err
    assert "\n" not in err
  with pytest.raises(SystemExit) as exit_info:
    compare.main(["--out", str(tmp_path / "c"), "--methods", "sgd", "adam"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("compare.py: error: --methods: method 'adam'"), err
  assert not (tmp_path / "c").exists()
  with pytest.raises(SystemExit):
    compare.main(["--out", str(tmp_path / "c"), "--epochs", "0"])
  assert "--epochs must be a positive int, got 0" in capsys.readouterr().err
