"""Checks shared by the tests that compare data-parallel modes.

Single device, `jit` on a device mesh and `pmap` are different XLA programs: their
reductions run in other orders, so their floats differ by rounding, and a training
trajectory amplifies rounding without bound. Comparisons are therefore made where
they are well-conditioned: a few steps, each leaf's disagreement measured against
how far that leaf moved from its initial value (never an absolute tolerance), and
the masks CrAM computes, which are discrete, compared exactly at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import optimizers
from experiments import parallel as parallel_lib

# Disagreement allowed between two modes, as a fraction of the leaf's movement
# from its initial value over 1-3 steps. Rounding gives at most 4e-5 on x86-64
# (measured as is, with XLA's fast math, without multi-threaded Eigen, and at
# backend optimisation level 0); the data-parallel bugs these tests guard against
# give 0.7 to 6 (a replica's own gradient, BatchNorm statistics or perturbation).
RTOL_OF_CHANGE = 1e-3
# Plus a few float32 ulps of the leaf: `x + update` rounds to the leaf's grid,
# which shows where the update is tiny next to the value (BatchNorm scales ~1).
ULPS = 4 * np.finfo(np.float32).eps
# A loss is one forward pass on equal params: nothing amplifies its rounding.
LOSS_RTOL = 1e-4


def spy_on_masks(monkeypatch):
  """Records the masks of the runner's CrAM compressor, built after this call.

  Returns a list that gets one (replica, flat mask) per replica and step (outside
  `pmap`, replica 0 once per step); read it after `jax.effects_barrier()` and
  split it with `masks_by_step`.
  """
  log = []
  make_compressor = optimizers.compressor_for

  def spying_compressor_for(config, select=None):
    base = make_compressor(config, select)
    under_pmap = config.parallel == "pmap"

    def spy(params, key):
      out, masks = base(params, key)
      flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(masks)])
      replica = jax.lax.axis_index(parallel_lib.AXIS) if under_pmap else 0
      jax.debug.callback(
          lambda i, f: log.append((int(i), np.asarray(f))), replica, flat
      )
      return out, masks

    return spy

  monkeypatch.setattr(optimizers, "compressor_for", spying_compressor_for)
  return log


def masks_by_step(log, parallel):
  """`spy_on_masks`'s records per step of the run's `parallel`, by replica.

  Under `pmap` every replica computes (and records) its mask; under `jit` the
  program records it once, however many devices the mesh has. A step's records
  all come before the next step's (that step needs this one's params).
  """
  num_replicas = parallel.num_replicas if parallel.axis_name else 1
  assert len(log) % num_replicas == 0, (len(log), num_replicas)
  return [
      sorted(log[i : i + num_replicas], key=lambda r: r[0])
      for i in range(0, len(log), num_replicas)
  ]


def assert_same_masks(got, want, num_replicas, where):
  """`got`: (replica, mask) of every replica, by replica; each exactly the mask
  of `want` (one replica's)."""
  ((_, reference),) = want
  assert [i for i, _ in got] == list(range(num_replicas)), where
  assert reference.sum() < reference.size, f"{where}: CrAM did not prune"
  for i, mask in got:
    differ = int(np.sum(mask != reference))
    assert differ == 0, f"{where}, replica {i}: {differ} mask entries differ"


def assert_close_relative_to_change(got, want, initial, where):
  """Leaf by leaf, `|got - want| <= RTOL_OF_CHANGE |want - initial| + ULPS |want|`.

  Norms over each leaf; `want` is the reference mode's state after some steps from
  `initial`, `got` another mode's after the same steps.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want), where
  for (path, w), g, x0 in zip(
      jax.tree_util.tree_leaves_with_path(want),
      jax.tree.leaves(got),
      jax.tree.leaves(initial),
  ):
    name = f"{where}{jax.tree_util.keystr(path)}"
    w, g, x0 = (np.asarray(v, np.float64) for v in (w, g, x0))
    change = np.linalg.norm(w - x0)
    assert change > 0, f"{name} did not move: nothing to compare"
    error = np.linalg.norm(g - w)
    bound = RTOL_OF_CHANGE * change + ULPS * np.linalg.norm(w)
    assert error <= bound, (
        f"{name} differs by {error:.3g}: {error / change:.3g} of its change "
        f"{change:.3g} from the initial value (allowed {RTOL_OF_CHANGE:g})"
    )
