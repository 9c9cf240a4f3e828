"""End-to-end runs of the experiment runner on `tfds.testing.mock_data`, offline.

Each test trains a tiny model for a few steps with `experiments.train`, checks what
the run leaves in its workdir (metrics, summary, checkpoints, config), then runs the
one-shot sweep of `experiments.oneshot` and checks the table, CSV and plot, and that
the pruned parameters really have the sparsity the CSV reports.

CIFAR-10 is served by `mock_data` (USE_CODE: random images and labels, the same
examples for every split). SQuAD is served from hand-made examples through
`mock_data(as_data_source_fn=...)`, because random answers would not be spans of their
contexts; the vocabulary is written by the test. Nothing is downloaded.
`conftest.py` gives 8 CPU devices, so global batches are multiples of 8.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import string

import compile_cache
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from parallel_checks import (
    LOSS_RTOL,
    assert_close_relative_to_change,
    assert_same_masks,
    masks_by_step,
    spy_on_masks,
)

import cram_jax
from cram_jax import data as data_lib
from experiments import oneshot
from experiments import train as train_lib
from experiments.checkpointing import Checkpointer
from experiments.configs import bert_squad, resnet20_cifar10
from experiments.metrics import read_jsonl

MOCK = tfds.testing.MockPolicy.USE_CODE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_STEPS = 4


# ----------------------------------------------------------------------------
# Shared set-up and checks.


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_for_this_module(tmp_path_factory):
  """A persistent compilation cache, for this module only.

  A run compiles the model's init twice (training, then `load_final` for the sweep)
  and the runs of `test_pmap_matches_jit` repeat the first test's init and
  evaluation programs; on CPU each of these costs seconds. The cache returns the same executables, so what
  is tested does not change. Config and cache state are restored afterwards.
  """
  with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache")):
    yield


@contextlib.contextmanager
def mock_tfds(data_dir, num_examples=1, examples=None):
  kwargs = {}
  if examples is not None:
    kwargs["as_data_source_fn"] = lambda self, split, **unused: examples
  with tfds.testing.mock_data(
      num_examples=num_examples, policy=MOCK, data_dir=str(data_dir), **kwargs
  ):
    yield


def due_steps(every, total):
  """The steps at which the runner acts every `every` steps, the last step included."""
  return sorted({*range(every, total + 1, every), total})


def check_run_outputs(run, config, metric, steps_per_epoch):
  """What train_and_evaluate promises to leave in its workdir."""
  total = config.num_train_steps
  rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
  train_rows = [r for r in rows if r["split"] == "train"]
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in train_rows] == due_steps(
      config.log_every_steps, total
  )
  assert [r["step"] for r in eval_rows] == due_steps(steps_per_epoch, total)
  for r in train_rows:
    assert np.isfinite(r["loss"]) and r["steps_per_second"] > 0
    assert r["epoch"] == pytest.approx(r["step"] / steps_per_epoch)
  for r in eval_rows:
    assert 0.0 <= r[metric] <= 1.0 and r["examples"] > 0

  with open(os.path.join(run, "metrics.csv"), newline="") as f:
    long_rows = list(csv.DictReader(f))
  assert set(long_rows[0]) == {"step", "split", "name", "value"}
  assert {(r["split"], r["name"]) for r in long_rows} >= {
      ("train", "loss"),
      ("eval", metric),
  }
  csv_eval = {
      int(r["step"]): float(r["value"])
      for r in long_rows
      if r["split"] == "eval" and r["name"] == metric
  }
  assert csv_eval == pytest.approx({r["step"]: r[metric] for r in eval_rows})

  with open(os.path.join(run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "completed"
  assert summary["step"] == summary["total_steps"] == total
  assert summary["eval"][metric] == pytest.approx(eval_rows[-1][metric])

  with open(os.path.join(run, "config.json")) as f:
    saved = json.load(f)
  assert saved["task"] == config.task and saved["name"] == "cram+-multi"
  assert saved["optimizer"]["wrapper"] == "cram"
  assert (
      saved["num_train_steps"] == total and saved["data_dir"] == config.data_dir
  )

  checkpointer = Checkpointer(
      os.path.join(run, "checkpoints"), every_steps=1, handle_sigterm=False
  )
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  due = due_steps(config.checkpoint_every_steps, total)
  assert steps == due[-config.keep_checkpoints :]


def capture_prune(monkeypatch):
  """Records every (pruned, masks) that the sweep evaluates, in call order."""
  calls = []
  prune = cram_jax.prune

  def recording_prune(params, compressor, **kwargs):
    pruned, masks = prune(params, compressor, **kwargs)
    calls.append((jax.device_get(pruned), jax.device_get(masks)))
    return pruned, masks

  monkeypatch.setattr(cram_jax, "prune", recording_prune)
  return calls


def count_pruned(pruned, masks):
  """Zeros and sizes of the compressed leaves, counted directly on the arrays."""
  zeros = size = 0
  for leaf, mask in zip(
      jax.tree.leaves(pruned),
      jax.tree.leaves(masks, is_leaf=lambda x: x is None),
  ):
    if mask is None:
      continue
    leaf = np.asarray(leaf)
    assert not leaf[
        ~np.asarray(mask)
    ].any()  # every masked-out weight is exactly 0
    zeros += int(np.sum(leaf == 0))
    size += leaf.size
  return zeros, size


def check_oneshot_outputs(
    paths, out, method, metric, sparsities, patterns, calls
):
  """The table, CSV and plot of oneshot.main, and the sparsities the CSV reports."""
  assert paths == {
      "table": os.path.join(out, "oneshot.md"),
      "csv": os.path.join(out, "oneshot.csv"),
      "plot": os.path.join(out, "oneshot.png"),
  }
  labels = (
      ["dense"]
      + [f"global {round(100 * s)}%" for s in sparsities]
      + [f"uniform {round(100 * s)}%" for s in sparsities]
      + [f"{n}:{m}" for n, m in patterns]
  )

  with open(paths["table"]) as f:
    text = f.read()
  assert text.startswith(f"{metric} (%)")
  lines = [line for line in text.splitlines() if line.startswith("|")]
  assert len(lines) == 3  # header, separator, one run
  assert [c.strip() for c in lines[0].strip("|").split("|")] == [
      "method",
      *labels,
  ]
  assert re.fullmatch(rf"\|(\s*:?-+:?\s*\|){{{len(labels) + 1}}}", lines[1])
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert cells[0] == method and len(cells) == len(labels) + 1
  for cell in cells[1:]:
    assert (
        0.0 <= float(cell) <= 100.0
    )  # percent; a missing metric would read nan

  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["compression"] for r in rows] == labels
  assert {r["method"] for r in rows} == {method}
  kinds = (
      ["dense"]
      + ["global"] * len(sparsities)
      + ["uniform"] * len(sparsities)
      + ["n:m"] * len(patterns)
  )
  assert [r["kind"] for r in rows] == kinds
  targets = [0.0, *sparsities, *sparsities, *(1 - n / m for n, m in patterns)]
  for row, target in zip(rows, targets):
    assert float(row["target_sparsity"]) == pytest.approx(target)
    assert float(row["prunable_sparsity"]) == pytest.approx(
        target, abs=1e-3
    ), row
    assert (
        0.0 <= float(row["total_sparsity"]) <= float(row["prunable_sparsity"])
    )
    assert 0.0 <= float(row[metric]) <= 1.0
  # Table cells are the CSV's metric in percent (rounded for display).
  for cell, row in zip(cells[1:], rows):
    assert float(cell) == pytest.approx(100 * float(row[metric]), abs=0.06)

  # The parameters the sweep evaluated have the sparsity it reports.
  assert (
      len(calls) == len(rows) - 1
  )  # one prune per compression; dense is not pruned
  for (pruned, masks), row in zip(calls, rows[1:]):
    zeros, size = count_pruned(pruned, masks)
    assert size > 0
    assert zeros / size == pytest.approx(
        float(row["prunable_sparsity"]), abs=1e-6
    )
    if row["kind"] == "global":  # exactly round((1 - s) N) weights kept
      assert size - zeros == round((1 - float(row["target_sparsity"])) * size)
  # N:M: at most n nonzeros in every group of m inputs of every compressed kernel.
  for (pruned, masks), (n, m) in zip(calls[-len(patterns) :], patterns):
    for leaf, mask in zip(
        jax.tree.leaves(pruned),
        jax.tree.leaves(masks, is_leaf=lambda x: x is None),
    ):
      if mask is None:
        continue
      leaf = np.moveaxis(np.asarray(leaf), -2, -1)
      groups = leaf.reshape(leaf.shape[:-1] + (leaf.shape[-1] // m, m))
      assert (np.count_nonzero(groups, axis=-1) <= n).all()

  with open(paths["plot"], "rb") as f:
    png = f.read()
  assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(paths["plot"]) as image:
    image.verify()
  with Image.open(paths["plot"]) as image:
    assert min(image.size) >= 200
    assert (
        len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    )  # not a blank canvas


# ----------------------------------------------------------------------------
# ResNet on CIFAR-10.

CIFAR_EXAMPLES = 32  # batch 16: 2 steps per epoch, so 2 evaluations in 4 steps


def resnet_config(data_dir, parallel="jit"):
  config = resnet20_cifar10.get_config("cram+-multi")
  config.model = "ResNet8"
  config.batch_size = config.eval_batch_size = 16
  config.num_train_steps = NUM_STEPS
  config.num_epochs, config.warmup_epochs = 2, 0
  config.checkpoint_every_steps = config.log_every_steps = 2
  config.progress = False
  config.parallel = parallel
  config.data_dir = str(data_dir)
  config.oneshot.sparsities = (0.5, 0.9)
  config.oneshot.bn_images = 16
  config.oneshot.bn_batches = 2
  config.oneshot.bn_batch_size = 8
  return config


def test_resnet_train_checkpoint_and_oneshot(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  run, out = str(tmp_path / "run"), str(tmp_path / "oneshot")
  config = resnet_config(data_dir)
  recalibrations = []
  recalibrate = cram_jax.recalibrate_batch_stats

  def counting_recalibrate(*args, **kwargs):
    recalibrations.append(1)
    return recalibrate(*args, **kwargs)

  monkeypatch.setattr(cram_jax, "recalibrate_batch_stats", counting_recalibrate)
  with mock_tfds(data_dir, num_examples=CIFAR_EXAMPLES):
    summary = train_lib.train_and_evaluate(config, run)
    assert (
        summary["status"] == "completed"
        and summary["eval"]["examples"] == CIFAR_EXAMPLES
    )
    check_run_outputs(
        run, config, "accuracy", steps_per_epoch=CIFAR_EXAMPLES // 16
    )

    calls = capture_prune(monkeypatch)
    paths = oneshot.main(["--workdir", run, "--out", out])
  check_oneshot_outputs(
      paths, out, "cram+-multi", "accuracy", (0.5, 0.9), ((2, 4), (4, 8)), calls
  )
  assert len(recalibrations) == len(
      calls
  )  # BN re-estimated after every compression


# ----------------------------------------------------------------------------
# BERT on SQuAD.

WORDS = (
    "the cat sat on mat dog ran in park who where did what is capital of"
    " paris france city river flows through green old small big and"
).split()
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + WORDS
    + list(string.ascii_lowercase)
    + ["##" + c for c in string.ascii_lowercase]
    + list(".,?!'\"")
)
CONTEXT = (
    "The old city of Paris is the capital of France. A green river flows"
    " through the city and the park. The small dog ran in the park and the"
    " big cat sat on the mat."
)
QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Where did the small dog run?", "in the park"),
    ("Who sat on the mat?", "the big cat"),
    ("What flows through the city?", "A green river"),
    ("What is old?", "The old city of Paris"),
    ("Where did the big cat sit?", "on the mat"),
    ("Who ran in the park?", "The small dog"),
    ("What is Paris the capital of?", "France"),
]


def squad_example(qid, question, answer):
  return {
      "id": qid.encode(),
      "title": b"Paris",
      "context": CONTEXT.encode(),
      "question": question.encode(),
      "answers": {
          "text": np.array([answer.encode()], dtype=object),
          "answer_start": np.array([CONTEXT.index(answer)], np.int32),
      },
  }


SQUAD_EXAMPLES = [
    squad_example(f"q{i}", q, a) for i, (q, a) in enumerate(QUESTIONS)
]


def bert_config(data_dir, vocab_file):
  config = bert_squad.get_config("cram+-multi")
  config.bert.size = "tiny"
  config.bert.overrides.vocab_size = len(VOCAB)
  config.bert.overrides.max_position_embeddings = 64
  config.bert.overrides.num_hidden_layers = (
      1  # compile time scales with the layers
  )
  config.data_dir = str(data_dir)
  config.data_options.vocab_file = vocab_file
  config.data_options.max_seq_length = 64
  config.data_options.doc_stride = 32
  config.data_options.max_query_length = 16
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = NUM_STEPS
  config.num_epochs = 1
  config.checkpoint_every_steps = config.log_every_steps = 2
  config.progress = False
  config.oneshot.sparsities = (0.5, 0.9)
  return config


def test_bert_squad_train_checkpoint_and_oneshot(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  run, out = str(tmp_path / "run"), str(tmp_path / "oneshot")
  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(VOCAB) + "\n")
  config = bert_config(data_dir, str(vocab_file))

  def no_batchnorm(*args, **kwargs):
    raise AssertionError("BERT has no BatchNorm: nothing to re-estimate")

  monkeypatch.setattr(cram_jax, "recalibrate_batch_stats", no_batchnorm)
  monkeypatch.setattr(oneshot, "calibration_images", no_batchnorm)
  with mock_tfds(data_dir, examples=SQUAD_EXAMPLES):
    summary = train_lib.train_and_evaluate(config, run)
    assert summary["eval"]["examples"] == len(SQUAD_EXAMPLES)
    assert {"f1", "exact_match"} <= set(summary["eval"])
    run_info = train_lib.build(config)
    check_run_outputs(
        run, config, "f1", steps_per_epoch=run_info.steps_per_epoch
    )

    calls = capture_prune(monkeypatch)
    paths = oneshot.main(["--workdir", run, "--out", out])
  check_oneshot_outputs(
      paths, out, "cram+-multi", "f1", (0.5, 0.9), ((2, 4), (4, 8)), calls
  )
  with open(paths["csv"], newline="") as f:
    assert {"f1", "exact_match"} <= set(next(csv.DictReader(f)))


# ----------------------------------------------------------------------------
# pmap gives the jit run's numbers.

# Few steps at a small learning rate: the comparison of two different programs
# stays well-conditioned (tests/parallel_checks.py). At lr 0.1 on random labels,
# rounding differences grew to 5% of a leaf after 4 steps.
PARALLEL_STEPS = 2
PARALLEL_LR = 0.02


def test_pmap_matches_jit(tmp_path):
  data_dir = tmp_path / "tfds"
  runs, states, metrics, masks = {}, {}, {}, {}
  with mock_tfds(data_dir, num_examples=CIFAR_EXAMPLES):
    for parallel in ("jit", "pmap"):
      config = resnet_config(data_dir, parallel)
      config.num_train_steps = PARALLEL_STEPS
      config.learning_rate = PARALLEL_LR
      workdir = str(tmp_path / parallel)
      with pytest.MonkeyPatch.context() as patch:
        mask_log = spy_on_masks(patch)
        summary = train_lib.train_and_evaluate(config, workdir)
        run, states[parallel] = train_lib.load_final(workdir)
      assert summary["status"] == "completed"
      assert run.config.parallel == parallel
      jax.effects_barrier()
      masks[parallel] = masks_by_step(mask_log, run.parallel)
      runs[parallel] = run
      metrics[parallel] = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    # The state both runs started from (the same program builds it in both).
    run = runs["jit"]
    sample = data_lib.make_dataset(
        run.config.dataset,
        run.config.train_split,
        num_epochs=1,
        **train_lib.train_data_kwargs(run.config, run.process_batch_size),
    )[0]
    initial = jax.device_get(
        train_lib.init_state(run, train_lib.device_keys(run.task, sample))
    )

  # Every step, every replica: the jit run's mask, exactly.
  assert len(masks["jit"]) == len(masks["pmap"]) == PARALLEL_STEPS
  for t, (got, want) in enumerate(zip(masks["pmap"], masks["jit"])):
    assert_same_masks(got, want, jax.local_device_count(), f"step {t + 1}")

  # The whole training state: discrete parts exactly, floats relative to how far
  # they moved from the initial state.
  jit, pmap = states["jit"], states["pmap"]
  assert int(pmap["step"]) == int(jit["step"]) == PARALLEL_STEPS
  assert int(pmap["opt_state"].count) == PARALLEL_STEPS
  np.testing.assert_array_equal(pmap["opt_state"].key, jit["opt_state"].key)
  np.testing.assert_array_equal(pmap["rng"], jit["rng"])
  for part in ("params", "batch_stats", "opt_state"):
    assert_close_relative_to_change(pmap[part], jit[part], initial[part], part)

  # Same metrics rows; losses to LOSS_RTOL, accuracy to one example of 32 (an
  # argmax may flip on a near-tie between two logits).
  assert [(r["step"], r["split"]) for r in metrics["jit"]] == [
      (r["step"], r["split"]) for r in metrics["pmap"]
  ]
  for a, b in zip(metrics["jit"], metrics["pmap"]):
    assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (a, b)
    assert abs(b["accuracy"] - a["accuracy"]) <= 1 / CIFAR_EXAMPLES, (a, b)
