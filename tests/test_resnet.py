"""Tests for cram_jax.models.resnet: sizes, BatchNorm modes, dtypes, prunable selections."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cram_jax.compress.select import path_str, selected
from cram_jax.models import resnet
from cram_jax.models.resnet import RESNET_PRUNABLE, RESNET_UNIFORM


def abstract_variables(model, size):
  x = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def kernel_paths(params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(p) for p, _ in leaves if path_str(p).endswith("/kernel")}


@pytest.fixture(scope="module")
def resnet20():
  model = resnet.ResNet20(num_classes=10)
  variables = jax.jit(
      lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False)
  )(jax.random.key(0))
  return model, variables


@pytest.mark.parametrize(
    "factory,size,expected",
    [
        (resnet.ResNet8, 32, 78_042),
        (resnet.ResNet20, 32, 272_474),
        (resnet.ResNet32, 32, 466_906),
        (resnet.ResNet44, 32, 661_338),
        (resnet.ResNet56, 32, 855_770),
        (resnet.ResNet110, 32, 1_730_714),
        (resnet.CifarResNet18, 32, 11_173_962),
        (resnet.ResNet18, 224, 11_689_512),
        (resnet.ResNet34, 224, 21_797_672),
        (resnet.ResNet50, 224, 25_557_032),
        (resnet.ResNet101, 224, 44_549_160),
        (resnet.ResNet152, 224, 60_192_808),
    ],
)
def test_parameter_counts(factory, size, expected):
  # The factories' docstrings quote these numbers; the ImageNet ones are torchvision's.
  variables = abstract_variables(factory(), size)
  assert count(variables["params"]) == expected
  assert factory.__doc__.replace(",", "").count(str(expected)) == 1


def test_resnet8_hand_count():
  # stem + BN; one block per stage, 1x1 shortcuts into stages 2 and 3; head.
  stem = 3 * 3 * 3 * 16 + 32
  stage1 = 2 * 9 * 16 * 16 + 2 * 32
  stage2 = 9 * 16 * 32 + 9 * 32 * 32 + 2 * 64 + 16 * 32 + 64
  stage3 = 9 * 32 * 64 + 9 * 64 * 64 + 2 * 128 + 32 * 64 + 128
  assert stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 78_042


def test_resnet20_hand_count():
  # stem 3*3*3*16 + BN; 3 stages of 3 blocks; two 1x1 shortcuts; 64*10 + 10 head.
  stem = 432 + 32
  stage1 = 3 * (2 * 9 * 16 * 16 + 2 * 32)
  stage2 = (9 * 16 * 32 + 9 * 32 * 32 + 2 * 64 + 16 * 32 + 64) + 2 * (
      2 * 9 * 32 * 32 + 2 * 64
  )
  stage3 = (9 * 32 * 64 + 9 * 64 * 64 + 2 * 128 + 32 * 64 + 128) + 2 * (
      2 * 9 * 64 * 64 + 2 * 128
  )
  head = 64 * 10 + 10
  assert stem + stage1 + stage2 + stage3 + head == 272_474


def test_output_shapes_and_dtypes(resnet20):
  model, variables = resnet20
  logits = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert set(variables) == {"params", "batch_stats"}


def test_imagenet_feature_map_shapes():
  model = resnet.ResNet50(num_classes=1000)
  variables = abstract_variables(model, 224)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(
          v,
          x,
          train=False,
          capture_intermediates=True,
          mutable=["intermediates"],
      ),
      variables,
      x,
  )
  inter = state["intermediates"]
  assert logits.shape == (2, 1000)
  assert inter["conv_init"]["__call__"][0].shape == (2, 112, 112, 64)
  assert inter["stage1_block3"]["__call__"][0].shape == (2, 56, 56, 256)
  assert inter["stage2_block1"]["__call__"][0].shape == (2, 28, 28, 512)
  assert inter["stage4_block3"]["__call__"][0].shape == (2, 7, 7, 2048)
  # v1.5: the stride sits on the 3x3 conv, the first 1x1 conv keeps the resolution.
  block = variables["params"]["stage2_block1"]
  assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert inter["stage2_block1"]["conv1"]["__call__"][0].shape == (
      2,
      56,
      56,
      128,
  )
  assert inter["stage2_block1"]["conv2"]["__call__"][0].shape == (
      2,
      28,
      28,
      128,
  )


def test_cifar_resnet18_has_no_pooling_stem():
  model = resnet.CifarResNet18(num_classes=10)
  variables = abstract_variables(model, 32)
  assert variables["params"]["conv_init"]["kernel"].shape == (3, 3, 3, 64)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(
          v,
          x,
          train=False,
          capture_intermediates=True,
          mutable=["intermediates"],
      ),
      variables,
      x,
  )
  assert state["intermediates"]["stage1_block2"]["__call__"][0].shape == (
      2,
      32,
      32,
      64,
  )
  assert state["intermediates"]["stage4_block2"]["__call__"][0].shape == (
      2,
      4,
      4,
      512,
  )


def test_conv_init_is_he_fan_out_normal(resnet20):
  _, variables = resnet20
  kernel = np.asarray(
      variables["params"]["stage3_block2"]["conv1"]["kernel"]
  )  # (3,3,64,64)
  expected_std = math.sqrt(2.0 / (3 * 3 * 64))
  assert abs(kernel.std() / expected_std - 1) < 0.03
  assert abs(kernel.mean()) < 0.05 * expected_std
  # A plain normal, not a truncated one: some draws lie beyond 2 standard deviations.
  assert (np.abs(kernel) > 2 * expected_std).mean() > 0.03
  head = np.asarray(variables["params"]["head"]["kernel"])
  assert np.abs(head).max() <= 1 / math.sqrt(64)
  assert not np.any(variables["params"]["head"]["bias"])
  bn = variables["params"]["bn_init"]
  assert np.all(bn["scale"] == 1) and not np.any(bn["bias"])


def test_train_mode_uses_batch_stats_and_updates_running_averages(resnet20):
  model, variables = resnet20
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * 2 + 0.5

  @jax.jit
  def train_apply(v, x):
    return model.apply(
        v,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "conv_init",
    )

  logits, state = train_apply(variables, x)
  stem = state["intermediates"]["conv_init"]["__call__"][0]
  new = state["batch_stats"]["bn_init"]
  # EMA with momentum 0.9 from mean 0 / var 1.
  np.testing.assert_allclose(
      new["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
      new["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4
  )
  # Every BatchNorm moved.
  for old_leaf, new_leaf in zip(
      jax.tree.leaves(variables["batch_stats"]),
      jax.tree.leaves(state["batch_stats"]),
  ):
    assert not np.allclose(old_leaf, new_leaf)
  # Batch statistics: an example's logits depend on the rest of the batch.
  other, _ = train_apply(variables, x.at[1:].multiply(3.0))
  assert not np.allclose(logits[0], other[0], atol=1e-4)


def test_eval_mode_uses_running_averages_and_mutates_nothing(resnet20):
  model, variables = resnet20
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  eval_apply = jax.jit(
      lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"])
  )
  logits, state = eval_apply(variables, x)
  jax.tree.map(
      np.testing.assert_array_equal,
      state["batch_stats"],
      variables["batch_stats"],
  )
  # Per-example: changing the other examples does not change example 0.
  other, _ = eval_apply(variables, x.at[1:].multiply(3.0))
  np.testing.assert_allclose(logits[0], other[0], rtol=1e-5, atol=1e-5)
  # And eval needs no mutable collection at all.
  np.testing.assert_allclose(
      model.apply(variables, x, train=False), logits, rtol=1e-5, atol=1e-5
  )


def test_bfloat16_compute_keeps_float32_params(resnet20):
  model = resnet.ResNet20(num_classes=10, dtype=jnp.bfloat16)
  _, variables = resnet20
  fresh = abstract_variables(model, 32)
  assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {
      jnp.dtype(jnp.float32)
  }
  logits, state = jax.jit(
      lambda v, x: model.apply(
          v,
          x,
          train=True,
          mutable=["batch_stats", "intermediates"],
          capture_intermediates=True,
      )
  )(variables, jnp.ones((2, 32, 32, 3)))
  inter = state["intermediates"]
  assert inter["conv_init"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["bn_init"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["stage3_block3"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["head"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(state["batch_stats"])} == {
      jnp.dtype("float32")
  }


def test_bn_axis_name_averages_statistics_across_the_named_axis(resnet20):
  _, variables = resnet20
  synced = resnet.ResNet20(num_classes=10, bn_axis_name="batch")
  plain = resnet.ResNet20(num_classes=10)
  x = jax.random.normal(jax.random.key(3), (2, 3, 32, 32, 3))

  def run(model, x):
    return model.apply(variables, x, train=True, mutable=["batch_stats"])

  logits, state = jax.jit(
      jax.vmap(lambda x: run(synced, x), axis_name="batch")
  )(x)
  full_logits, full_state = jax.jit(lambda x: run(plain, x))(
      x.reshape(6, 32, 32, 3)
  )
  np.testing.assert_allclose(
      logits.reshape(6, 10), full_logits, rtol=2e-4, atol=2e-4
  )
  mean = state["batch_stats"]["stage2_block1"]["shortcut_bn"]["mean"]
  np.testing.assert_allclose(
      mean[0],
      full_state["batch_stats"]["stage2_block1"]["shortcut_bn"]["mean"],
      rtol=1e-4,
      atol=1e-6,
  )


@pytest.mark.parametrize(
    "factory,size,n_kernels",
    [
        # 7 3x3 convs (stem + 3 blocks * 2), 2 1x1 shortcuts, the head.
        (resnet.ResNet8, 32, 10),
        # 19 3x3 convs (stem + 9 blocks * 2), 2 1x1 shortcuts, the head.
        (resnet.ResNet20, 32, 22),
        # stem + 8 blocks * 2 + 3 shortcuts + head.
        (resnet.CifarResNet18, 32, 21),
        # stem + 16 bottlenecks * 3 + 4 shortcuts + head.
        (resnet.ResNet50, 224, 54),
    ],
)
def test_default_selection_is_every_kernel(factory, size, n_kernels):
  variables = abstract_variables(factory(), size)
  params = variables["params"]
  paths = [p for p, _ in selected(params, RESNET_PRUNABLE)]
  assert len(paths) == n_kernels
  assert set(paths) == kernel_paths(params)
  assert "conv_init/kernel" in paths and "head/kernel" in paths
  # On the full variables the same kernels are picked and no BatchNorm statistic.
  full = [p for p, _ in selected(variables, RESNET_PRUNABLE)]
  assert full == ["params/" + p for p in paths]


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_uniform_selection_skips_stem_and_head(resnet20, prefix):
  _, variables = resnet20
  tree = variables if prefix else variables["params"]
  paths = {p for p, _ in selected(tree, RESNET_UNIFORM)}
  everything = {p for p, _ in selected(tree, RESNET_PRUNABLE)}
  assert everything - paths == {
      prefix + "conv_init/kernel",
      prefix + "head/kernel",
  }
  assert len(paths) == 20
  assert prefix + "stage2_block1/shortcut_conv/kernel" in paths


def test_invalid_options_raise():
  with pytest.raises(ValueError, match="stem must be one of"):
    resnet.ResNet(
        stage_sizes=(1,),
        widths=(8,),
        block_cls=resnet.BasicBlock,
        num_classes=3,
        stem="tiny",
    )
  with pytest.raises(
      ValueError, match="num_classes must be a positive int, got 0"
  ):
    resnet.ResNet20(num_classes=0)
  with pytest.raises(ValueError, match="same length"):
    resnet.ResNet(
        stage_sizes=(1, 1),
        widths=(8,),
        block_cls=resnet.BasicBlock,
        num_classes=3,
    )
  with pytest.raises(TypeError, match="block_cls must be a Module class"):
    resnet.ResNet(
        stage_sizes=(1,), widths=(8,), block_cls="basic", num_classes=3
    )
  model = resnet.ResNet20()
  with pytest.raises(ValueError, match=r"NHWC.*\(32, 32, 3\)"):
    jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((32, 32, 3)), train=False
        )
    )


def _resnet(**overrides):
  fields = dict(
      stage_sizes=(1,), widths=(8,), block_cls=resnet.BasicBlock, num_classes=3
  )
  return resnet.ResNet(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            dict(num_classes=10.0),
            TypeError,
            "num_classes must be a positive int, got float 10.0",
        ),
        (
            dict(num_classes=True),
            TypeError,
            "num_classes must be a positive int, got bool",
        ),
        (
            dict(num_classes=-2),
            ValueError,
            "num_classes must be a positive int, got -2",
        ),
        (
            dict(stage_sizes=(0,)),
            ValueError,
            r"stage_sizes\[0\] must be a positive int, got 0",
        ),
        (
            dict(stage_sizes=3),
            TypeError,
            "stage_sizes must be a non-empty sequence",
        ),
        (
            dict(stage_sizes=(), widths=()),
            TypeError,
            "stage_sizes must be a non-empty",
        ),
        (
            dict(widths=(8.5,)),
            TypeError,
            r"widths\[0\] must be a positive int, got float",
        ),
        (
            dict(block_cls=resnet.nn.Dense),
            TypeError,
            r"block_cls=Dense lacks the fields \['conv', 'filters', 'norm', 'strides'\]",
        ),
        (
            dict(block_cls=resnet.BasicBlock(8, 1, None, None)),
            TypeError,
            "block_cls must be a Module class",
        ),
        (dict(dtype="bf16"), TypeError, "dtype='bf16' is not a dtype"),
        (
            dict(param_dtype="fp32"),
            TypeError,
            "param_dtype='fp32' is not a dtype",
        ),
    ],
)
def test_bad_fields_are_named_when_the_model_is_built(
    overrides, error, message
):
  with pytest.raises(error, match=message):
    _resnet(**overrides)


def test_numpy_ints_are_sizes():
  model = _resnet(num_classes=np.int64(3), stage_sizes=(np.int32(1),))
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False
      )
  )
  assert shapes["params"]["head"]["kernel"].shape == (8, 3)


@pytest.mark.parametrize(
    "factory,size,head_inputs",
    [
        (resnet.ResNet8, 32, 64),
        (resnet.ResNet20, 32, 64),
        (resnet.ResNet50, 224, 2048),
    ],
)
def test_nm_selection_fits_n_of_m_on_zoo_resnets(factory, size, head_inputs):
  from cram_jax.compress import n_of_m  # noqa: PLC0415
  from cram_jax.models import RESNET_NM  # noqa: PLC0415

  params = abstract_variables(factory(), size)["params"]
  chosen = dict(selected(params, RESNET_NM))
  # Every kernel but the RGB stem, head included.
  assert set(chosen) == kernel_paths(params) - {"conv_init/kernel"}
  assert chosen["head/kernel"].shape[0] == head_inputs
  for path, leaf in chosen.items():
    assert leaf.shape[-2] % 16 == 0, (path, leaf.shape)  # 2:4, 4:8, 8:16
  for n, m in ((2, 4), (4, 8)):
    masks = jax.eval_shape(n_of_m(n, m, select=RESNET_NM), params)[1]
    with_mask = {
        path_str(p)
        for p, x in jax.tree_util.tree_flatten_with_path(
            masks, is_leaf=lambda x: x is None
        )[0]
        if x is not None
    }
    assert with_mask == set(chosen)
  # Without it, the 3-input stem is the one leaf that stops 2:4.
  with pytest.raises(ValueError, match="leaf 'conv_init/kernel' has 3 inputs"):
    jax.eval_shape(n_of_m(2, 4), params)
