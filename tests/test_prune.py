"""One-shot pruning, sparsity reports and fine-tuning with fixed masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cram_jax import compress, keep_pruned, prune, sparsity_report


def params_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "conv": {
          "kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
      },
      "head": {
          "kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
          "bias": jnp.zeros((10,), jnp.float32),
      },
  }


def test_prune_and_report_count_exact_zeros():
  params = params_tree()
  pruned, masks = prune(params, compress.global_magnitude(0.8))
  report = sparsity_report(pruned, masks)
  prunable = 3 * 3 * 4 * 8 + 8 * 10
  total = prunable + 8 + 10
  # Oracle: count with NumPy directly.
  zeros_prunable = sum(
      int(np.sum(np.asarray(pruned[k]["kernel"]) == 0)) for k in pruned
  )
  zeros_all = zeros_prunable + sum(
      int(np.sum(np.asarray(pruned[k]["bias"]) == 0)) for k in pruned
  )
  assert report.prunable_size == prunable and report.total_size == total
  assert (
      report.prunable_zeros
      == zeros_prunable
      == prunable - round(0.2 * prunable)
  )
  assert (
      report.total_zeros == zeros_all
  )  # the head bias is all zeros: counted in "all"
  assert report.total_sparsity == pytest.approx(zeros_all / total)
  rows = {r.path: r for r in report.rows}
  assert rows["head/bias"].zeros == 10 and not rows["head/bias"].prunable
  assert rows["conv/kernel"].prunable
  text = str(report)
  assert "| **prunable** |" in text and "| **all parameters** |" in text


def test_report_without_masks_uses_the_default_selection():
  report = sparsity_report(params_tree())
  assert [r.path for r in report.rows if r.prunable] == [
      "conv/kernel",
      "head/kernel",
  ]
  assert report.prunable_zeros == 0


def test_prune_with_sampled_level_needs_key():
  with pytest.raises(ValueError, match="needs a PRNG key"):
    prune(params_tree(), compress.global_magnitude([0.5, 0.9]))
  pruned, masks = prune(
      params_tree(),
      compress.global_magnitude([0.5, 0.9]),
      key=jax.random.key(0),
  )
  assert sparsity_report(pruned, masks).prunable_zeros in (
      round(0.5 * 368),
      368 - round(0.1 * 368),
  )


def test_keep_pruned_holds_zeros_through_adamw_fine_tuning():
  params = params_tree()
  pruned, masks = prune(params, compress.n_of_m(2, 4))
  tx = keep_pruned(optax.adamw(1e-2, weight_decay=0.1), masks)
  target = jax.tree.map(lambda x: jnp.ones_like(x) * 3.0, params)

  def loss(p):
    return sum(
        jnp.sum((a - b) ** 2)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
    )

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  p, s = pruned, tx.init(pruned)
  for _ in range(20):
    p, s = step(p, s)
  for name in ("conv", "head"):
    mask = np.asarray(masks[name]["kernel"])
    kernel = np.asarray(p[name]["kernel"])
    assert np.all(kernel[~mask] == 0.0)  # exactly zero, not just small
    assert not np.allclose(
        kernel[mask], np.asarray(pruned[name]["kernel"])[mask]
    )  # trained
  assert not np.allclose(p["head"]["bias"], 0.0)  # unmasked leaves train freely


def test_keep_pruned_zeroes_weights_that_were_not_pruned_yet():
  params = params_tree()
  _, masks = prune(params, compress.global_magnitude(0.5))
  tx = keep_pruned(optax.sgd(0.1), masks)
  updates, _ = tx.update(
      jax.tree.map(jnp.zeros_like, params), tx.init(params), params
  )
  after = optax.apply_updates(params, updates)
  assert np.all(
      np.asarray(after["conv"]["kernel"])[~np.asarray(masks["conv"]["kernel"])]
      == 0
  )


def test_mismatched_mask_trees_are_rejected():
  params = params_tree()
  _, masks = prune(params, compress.global_magnitude(0.5))
  wrong = {"conv": masks["conv"]}
  with pytest.raises(ValueError, match="does not match the params tree"):
    keep_pruned(optax.sgd(0.1), wrong).init(params)
  with pytest.raises(ValueError, match="does not match the params tree"):
    sparsity_report(params, wrong)
  bad_shape = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
  bad_shape["head"]["kernel"] = jnp.ones((10, 8), bool)
  with pytest.raises(ValueError, match="leaf 'head/kernel' has shape"):
    keep_pruned(optax.sgd(0.1), bad_shape).init(params)


def _params_only(p, key=None):
  return p


@pytest.mark.parametrize(
    "compressor,kwargs,error,match",
    [
        (0.9, {}, TypeError, "prune: compressor must be callable"),
        (
            compress.global_magnitude,
            {},
            TypeError,
            r"prune: got the compressor factory global_magnitude itself; did "
            r"you mean global_magnitude\(...\)",
        ),
        # Under prune's jit the level is traced: it used to be clamped to 0.7.
        (
            compress.global_magnitude([0.5, 0.7]),
            dict(level=2),
            ValueError,
            r"level must index one of the 2 sparsities \(0 <= level < 2\), "
            "got 2",
        ),
        (
            compress.layerwise_magnitude([0.5, 0.7]),
            dict(level=np.int64(-1)),
            ValueError,
            "got -1",
        ),
        (
            compress.global_magnitude([0.5, 0.7]),
            dict(level=1.0),
            TypeError,
            "level must be an int index, got 1.0",
        ),
        (
            compress.n_of_m(2, 4),
            dict(level=1),
            TypeError,
            r"compressor\(params, key, level=...\): got an unexpected keyword",
        ),
        (
            compress.global_magnitude(0.5),
            dict(key="abc"),
            TypeError,
            "prune: key must be a PRNG key",
        ),
        (
            _params_only,
            {},
            TypeError,
            r"prune: compressor must return a pair \(compressed_params, "
            r"masks\), got a dict",
        ),
    ],
)
def test_prune_bad_arguments(compressor, kwargs, error, match):
  with pytest.raises(error, match=match):
    prune(params_tree(), compressor, **kwargs)


def test_sparsity_report_select():
  params = params_tree()
  with pytest.raises(TypeError, match="use include='kernel'"):
    sparsity_report(params, select="kernel")
  _, masks = prune(params, compress.global_magnitude(0.5))
  with pytest.raises(ValueError, match="pass masks= or select=, not both"):
    sparsity_report(params, masks, select=compress.Selection())
  report = sparsity_report(params, select=compress.Selection(include="head"))
  assert [r.path for r in report.rows if r.prunable] == ["head/kernel"]
  assert report.prunable_size == 80


@pytest.mark.parametrize(
    "optimizer,masks,error,match",
    [
        (
            optax.adamw,
            "ok",
            TypeError,
            r"keep_pruned: optimizer must be an optax.GradientTransformation, "
            r"got the callable optax.adamw; did you mean optax.adamw\(...\)",
        ),
        (optax.sgd(0.1), None, ValueError, "keep_pruned: masks is None"),
        (
            optax.sgd(0.1),
            "float",
            TypeError,
            "mask for leaf 'conv/kernel' must be a bool array or None",
        ),
    ],
)
def test_keep_pruned_bad_arguments(optimizer, masks, error, match):
  _, good = prune(params_tree(), compress.global_magnitude(0.5))
  if masks == "ok":
    masks = good
  elif masks == "float":
    masks = jax.tree.map(
        lambda m: None if m is None else m.astype(jnp.float32),
        good,
        is_leaf=lambda x: x is None,
    )
  with pytest.raises(error, match=match):
    keep_pruned(optimizer, masks)


def test_keep_pruned_update_checks_params_at_trace_time():
  params = params_tree()
  _, masks = prune(params, compress.global_magnitude(0.5))
  tx = keep_pruned(optax.sgd(0.1), masks)
  other = dict(params, head={"kernel": jnp.ones((8, 5)), "bias": jnp.ones(5)})
  with pytest.raises(
      ValueError,
      match=r"the mask tree leaf 'head/kernel' has shape \(8, 10\), the "
      r"params leaf has shape \(8, 5\)",
  ):
    jax.eval_shape(lambda p: tx.update(p, optax.sgd(0.1).init(p), p), other)
  wrong_grads = dict(
      params, head={"kernel": jnp.ones((1, 10)), "bias": jnp.ones(10)}
  )
  with pytest.raises(
      ValueError,
      match=r"grads \(updates\) leaf 'head/kernel' has shape \(1, 10\)",
  ):
    jax.eval_shape(
        lambda g, p: tx.update(g, tx.init(p), p), wrong_grads, params
    )


def variables_tree(seed=0):
  """Linen-style variables: BatchNorm scale/bias/mean/var are never prunable."""
  rng = np.random.default_rng(seed)
  params = params_tree(seed)
  params["bn"] = {
      "scale": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
      "bias": jnp.zeros((8,), jnp.float32),
  }
  return {
      "params": params,
      "batch_stats": {"bn": {"mean": jnp.zeros((8,)), "var": jnp.ones((8,))}},
  }


def test_sparsity_summary_is_a_flat_dict_of_exact_counts():
  from cram_jax import sparsity_summary  # noqa: PLC0415

  variables = variables_tree()
  pruned, masks = prune(
      variables, compress.layerwise_magnitude(0.75, include="kernel")
  )
  # Oracle, counted here: conv kernel 288 -> keeps 72, head kernel 80 -> 20.
  conv = np.asarray(pruned["params"]["conv"]["kernel"])
  head = np.asarray(pruned["params"]["head"]["kernel"])
  assert (conv != 0).sum() == 72 and (head != 0).sum() == 20
  every = jax.tree.leaves(pruned)
  total = sum(int(np.size(x)) for x in every)
  nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in every)
  assert total == 288 + 8 + 80 + 10 + 8 + 8 + 8 + 8
  summary = sparsity_summary(pruned, masks)
  assert summary == {
      "sparsity/prunable": (368 - 92) / 368,
      "sparsity/overall": (total - nonzero) / total,
      "nonzero/prunable": 92,
      "nonzero/overall": nonzero,
  }
  assert all(isinstance(v, (int, float)) for v in summary.values())
  per_leaf = sparsity_summary(pruned, masks, per_leaf=True)
  assert per_leaf == dict(
      summary,
      **{
          "sparsity/params/conv/kernel": 216 / 288,
          "sparsity/params/head/kernel": 60 / 80,
      },
  )
  # Without masks the default selection decides: still no BatchNorm leaf.
  keys = set(sparsity_summary(pruned, per_leaf=True))
  assert not any("bn" in k or "batch_stats" in k for k in keys)
  assert sparsity_report(pruned, masks).summary() == summary


def test_sparsity_summary_bad_arguments():
  from cram_jax import sparsity_summary  # noqa: PLC0415

  params = params_tree()
  with pytest.raises(
      TypeError, match="sparsity_summary: per_leaf must be True"
  ):
    sparsity_summary(params, per_leaf="yes")
  clash = {"prunable": jnp.ones((2, 2)), "other": jnp.ones((2, 2))}
  with pytest.raises(
      ValueError, match="leaf 'prunable' would overwrite the total"
  ):
    sparsity_summary(clash, per_leaf=True)
  assert "sparsity/other" not in sparsity_summary(clash)
