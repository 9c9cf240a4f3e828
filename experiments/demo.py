"""The main job: does CrAM make a network survive one-shot pruning?

Trains a small convolutional network with BatchNorm on scikit-learn's bundled
handwritten digits (1797 real 8x8 images, offline) twice, with plain SGD and with
CrAM+-Multi, then prunes each one-shot (global magnitude at 50/70/80/90%, and 2:4),
re-estimates BatchNorm statistics, and prints the test accuracies.

  python experiments/demo.py [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import cram_jax
from cram_jax import compress


class DigitsCNN(nn.Module):
  """Three conv + BatchNorm layers and a linear classifier (~24k parameters)."""

  @nn.compact
  def __call__(self, x, train: bool):
    for i, (features, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      x = nn.Conv(features, (3, 3), strides=stride, use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def load_data(seed: int = 0):
  digits = load_digits()
  images = (digits.images.astype(np.float32) / 16.0)[..., None]
  order = np.random.default_rng(seed).permutation(len(images))
  train, test = order[:1437], order[1437:]
  mean, std = images[train].mean(), images[train].std()
  images = (images - mean) / std
  return (images[train], digits.target[train]), (images[test], digits.target[test])


def shift_augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random translation by up to one pixel (zero padding)."""
  padded = np.pad(batch, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.empty_like(batch)
  for i, (dy, dx) in enumerate(rng.integers(0, 3, size=(len(batch), 2))):
    out[i] = padded[i, dy:dy + 8, dx:dx + 8]
  return out


def make_optimizer(method: str, steps: int, lr: float, rho: float):
  schedule = optax.cosine_decay_schedule(lr, steps)
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))
  if method == "SGD":
    return base
  return cram_jax.cram(base, compress.global_magnitude([0.5, 0.7, 0.8, 0.9]), rho=rho, key=0)


def train(method: str, data, *, epochs: int, batch_size: int, lr: float, rho: float, seed: int):
  (x_train, y_train), _ = data
  model = DigitsCNN()
  variables = model.init(jax.random.key(seed), x_train[:1], train=False)
  steps_per_epoch = len(x_train) // batch_size
  tx = make_optimizer(method, epochs * steps_per_epoch, lr, rho)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
    # CrAM's compressed pass: same batch, train-mode BatchNorm, statistics dropped.
    grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, batch_stats, x, y)[0]
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for b in range(steps_per_epoch):
      idx = order[b * batch_size:(b + 1) * batch_size]
      x = shift_augment(x_train[idx], rng)
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y_train[idx])
  return model, {"params": params, "batch_stats": batch_stats}


def accuracy(model, variables, x, y) -> float:
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return float(np.mean(np.argmax(logits, -1) == y))


def one_shot(model, variables, data, compressor, seed: int) -> tuple[float, float]:
  """Prune once, re-estimate BatchNorm statistics, evaluate. Returns (accuracy, sparsity)."""
  (x_train, _), (x_test, y_test) = data
  pruned, masks = cram_jax.prune(variables["params"], compressor)
  batches = cram_jax.calibration_batches(x_train, seed=seed, augment=shift_augment)
  tuned = cram_jax.recalibrate_batch_stats(
      model, {"params": pruned, "batch_stats": variables["batch_stats"]}, batches)
  report = cram_jax.sparsity_report(pruned, masks)
  return accuracy(model, tuned, x_test, y_test), report.prunable_sparsity


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  data = load_data(args.seed)
  levels = [("50%", compress.global_magnitude(0.5)), ("70%", compress.global_magnitude(0.7)),
            ("80%", compress.global_magnitude(0.8)), ("90%", compress.global_magnitude(0.9)),
            # The first conv has 1 input channel: N:M cannot apply, it stays dense.
            ("2:4", compress.n_of_m(2, 4, on_indivisible="skip"))]
  print(f"digits: {len(data[0][0])} train / {len(data[1][0])} test images; "
        f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; "
        f"one-shot global magnitude pruning + BatchNorm re-estimation (100 batches of 128)")
  rows = []
  for method in ("SGD", "CrAM+-Multi"):
    start = time.perf_counter()
    model, variables = train(method, data, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, rho=args.rho, seed=args.seed)
    dense = accuracy(model, variables, *data[1])
    pruned = [one_shot(model, variables, data, c, args.seed)[0] for _, c in levels]
    rows.append((method, dense, pruned))
    print(f"  trained {method} in {time.perf_counter() - start:.0f} s")

  print("\nTest accuracy (%), 360 test images:\n")
  print("| method | dense | " + " | ".join(name for name, _ in levels) + " |")
  print("|---|---:|" + "---:|" * len(levels))
  for method, dense, pruned in rows:
    print(f"| {method} | {100 * dense:.1f} | " +
          " | ".join(f"{100 * a:.1f}" for a in pruned) + " |")
  print("\nSparsities are of the prunable (conv + dense) kernels; 2:4 leaves the 1-channel "
        "first conv dense.")


if __name__ == "__main__":
  main()
