"""ResNets for CIFAR and ImageNet (Flax Linen, NHWC).

Three families share one :class:`ResNet` module:

* CIFAR ResNet-20/32/44/56/110 (He et al. 2016, section 4.2): a 3x3 stem with 16
  channels, three stages of BasicBlocks with 16/32/64 channels, and 1x1 conv +
  BatchNorm shortcuts where the shape changes ("option B", as the CrAM reference).
* CIFAR ResNet-18: the ImageNet ResNet-18 body (BasicBlocks with 64/128/256/512
  channels) behind a 3x3 stride-1 stem without max-pooling.
* ImageNet ResNet-18/34/50/101/152, v1.5: a 7x7 stride-2 stem and a 3x3 max-pool; in
  bottleneck blocks the stride sits on the 3x3 conv. The layout and parameter counts
  are torchvision's.

Conventions: convs have no bias and are initialised with
``normal(0, sqrt(2 / (k * k * C_out)))`` (``variance_scaling(2.0, 'fan_out', 'normal')``,
PyTorch's ``kaiming_normal_(mode='fan_out')``); BatchNorm uses momentum 0.9 (PyTorch's
0.1) and epsilon 1e-5, scale 1 and bias 0; the classifier kernel is drawn like PyTorch's
``nn.Linear`` default (uniform with variance ``1 / (3 * fan_in)``) and its bias starts at
zero. Paddings are explicit and symmetric (``k // 2``) as in PyTorch; ``'SAME'`` would
pad stride-2 convs on one side only and shift every window against torchvision's.
Flax's BatchNorm updates the running variance with the biased batch variance (PyTorch
uses the unbiased one), a relative difference of ``1 / (n - 1)`` per update.

Modules are named so key paths read well in a :class:`~cram_jax.compress.select.Selection`:
``conv_init``/``bn_init`` (stem), ``stage{i}_block{j}/{conv,bn}{k}``,
``stage{i}_block{j}/shortcut_{conv,bn}`` and ``head`` (classifier).

Example::

  model = ResNet20(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cram_jax.compress import validate
from cram_jax.compress.select import Selection

ModuleDef = Any

# Variance 2 / fan_out with fan_out = k * k * C_out: He init on the backward pass.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), has variance 1/(3 fan_in).
head_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)

RESNET_PRUNABLE = Selection()
"""Every conv kernel (stem and 1x1 shortcuts included) and the classifier kernel.

This is the default rule of docs/method.md section 3, used by global-magnitude CrAM runs.
"""

RESNET_UNIFORM = Selection(
    exclude=(r"(^|/)conv_init/kernel$", r"(^|/)head/kernel$")
)
"""All conv kernels except the stem conv, and not the classifier.

The reference keeps these two layers dense in its uniform (layer-wise) runs. The
patterns match both ``variables['params']`` paths (``conv_init/kernel``) and full
variables paths (``params/conv_init/kernel``).
"""

RESNET_NM = Selection(exclude=r"(^|/)conv_init/kernel$")
"""Every conv and dense kernel except the stem conv: the N:M selection for the zoo.

``n_of_m(2, 4, select=RESNET_NM)`` works on every zoo ResNet without
``on_indivisible``. N:M groups run along the input axis, and the RGB stem
``conv_init`` has 3 inputs, which no M in use (2, 4, 8, 16) divides. Every other
kernel has as inputs a stage width or a multiple of it: 16/32/64 in the CIFAR
ResNet-20 family, 64 to 512 (BasicBlock) or 64 to 2048 (Bottleneck) otherwise,
shortcuts included; the classifier ``head`` reads the pooled features, 64 /
512 / 2048 inputs. So any M dividing 16 (2:4, 4:8, 8:16) fits every zoo
ResNet. This is a fixed exclusion, not a divisibility test: a custom ``widths``
that some M does not divide makes ``n_of_m`` raise, naming the leaf.
"""


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm; 1x1 conv + BatchNorm shortcut when the shape changes.

  Attributes:
    filters: output channels.
    strides: stride of the first 3x3 conv and of the shortcut.
    conv: a partially applied ``nn.Conv``.
    norm: a partially applied ``nn.BatchNorm``.
  """

  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv1")(
        x
    )
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), 1, padding=1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    shortcut = x
    if x.shape != y.shape:
      shortcut = self.conv(
          self.filters, (1, 1), self.strides, padding=0, name="shortcut_conv"
      )(x)
      shortcut = self.norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs with 4x expansion, BatchNorm after each.

  Attributes:
    filters: channels of the inner convs; the block outputs ``4 * filters``.
    strides: stride of the 3x3 conv and of the shortcut.
    conv: a partially applied ``nn.Conv``.
    norm: a partially applied ``nn.BatchNorm``.
  """

  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.filters * self.expansion
    y = self.conv(self.filters, (1, 1), 1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=1, name="conv2")(
        y
    )
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(out, (1, 1), 1, padding=0, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    shortcut = x
    if x.shape != y.shape:
      shortcut = self.conv(
          out, (1, 1), self.strides, padding=0, name="shortcut_conv"
      )(x)
      shortcut = self.norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


_STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
  """A ResNet on NHWC images; use the factories (``ResNet20``, ``ResNet50``, ...).

  Attributes:
    stage_sizes: number of blocks per stage.
    widths: block ``filters`` per stage (bottlenecks output 4x as many channels).
    block_cls: :class:`BasicBlock`, :class:`Bottleneck` or a Module class with the same
      fields (``filters, strides, conv, norm``).
    num_classes: outputs of the classifier ``head``.
    stem: ``'cifar'`` (3x3 stride-1 conv, no pooling) or ``'imagenet'`` (7x7 stride-2
      conv and 3x3 stride-2 max-pool); either has ``widths[0]`` channels.
    dtype: compute dtype of convs, BatchNorm and the head (e.g. ``jnp.bfloat16``).
      Logits are returned in float32 so the loss is computed in full precision.
    param_dtype: dtype of parameters and BatchNorm statistics.
    bn_axis_name: passed to ``nn.BatchNorm(axis_name=...)`` to average batch statistics
      across devices under ``pmap``/``shard_map``; None (plain ``jit``) by default.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  def __post_init__(self):
    if self.stem not in _STEMS:
      raise ValueError(
          f"ResNet: stem must be one of {_STEMS}, got {self.stem!r}"
      )
    validate.check_positive_int(self.num_classes, "num_classes", "ResNet")
    for name in ("stage_sizes", "widths"):
      value = getattr(self, name)
      if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise TypeError(
            f"ResNet: {name} must be a non-empty sequence of positive ints "
            f"(one per stage), got {value!r}"
        )
      for i, item in enumerate(value):
        validate.check_positive_int(item, f"{name}[{i}]", "ResNet")
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
          f"ResNet: stage_sizes {tuple(self.stage_sizes)} and widths "
          f"{tuple(self.widths)} must have the same length"
      )
    if not (
        isinstance(self.block_cls, type)
        and issubclass(self.block_cls, nn.Module)
    ):
      raise TypeError(
          f"ResNet: block_cls must be a Module class such as BasicBlock or "
          f"Bottleneck, got {self.block_cls!r}"
      )
    fields = {f.name for f in dataclasses.fields(self.block_cls)}
    lacking = sorted({"filters", "strides", "conv", "norm"} - fields)
    if lacking:
      raise TypeError(
          f"ResNet: block_cls={self.block_cls.__name__} lacks the fields "
          f"{lacking}; a block is built as block_cls(filters, strides, conv=..., "
          "norm=...), like BasicBlock and Bottleneck"
      )
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise TypeError(
            f"ResNet: {name}={getattr(self, name)!r} is not a dtype (e.g. "
            "jnp.float32, jnp.bfloat16)"
        ) from None
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool):
    """Returns float32 logits of shape ``(batch, num_classes)``.

    Args:
      x: images, ``(batch, height, width, channels)``.
      train: True normalises with batch statistics and updates ``batch_stats`` (apply
        with ``mutable=['batch_stats']``); False uses the running averages.
    """
    if x.ndim != 4:
      raise ValueError(
          f"ResNet: expects NHWC images with 4 dims, got shape {x.shape}"
      )
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        axis_name=self.bn_axis_name,
    )
    if self.stem == "cifar":
      x = conv(self.widths[0], (3, 3), 1, padding=1, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      x = conv(self.widths[0], (7, 7), 2, padding=3, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(
            width,
            strides,
            conv=conv,
            norm=norm,
            name=f"stage{i + 1}_block{j + 1}",
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
        self.num_classes,
        kernel_init=head_kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="head",
    )(x)
    return x.astype(jnp.float32)


def _cifar_resnet(depth: int, num_classes: int, **kwargs) -> ResNet:
  blocks = (depth - 2) // 6
  return ResNet(
      stage_sizes=(blocks,) * 3,
      widths=(16, 32, 64),
      block_cls=BasicBlock,
      num_classes=num_classes,
      stem="cifar",
      **kwargs,
  )


def ResNet8(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR-style ResNet-8 (1 BasicBlock per stage): 78,042 params with 10 classes.

  For quick runs such as the demo.
  10 prunable kernels: 7 3x3 convs, 2 shortcut convs and the head.
  """
  return _cifar_resnet(8, num_classes, **kwargs)


def ResNet20(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR ResNet-20 (3 BasicBlocks per stage): 272,474 params with 10 classes.

  22 prunable kernels: 19 3x3 convs (stem + 18 in blocks), 2 1x1 shortcut convs and the
  head. ``kwargs`` go to :class:`ResNet` (``dtype``, ``param_dtype``, ``bn_axis_name``).
  """
  return _cifar_resnet(20, num_classes, **kwargs)


def ResNet32(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR ResNet-32 (5 BasicBlocks per stage): 466,906 params with 10 classes."""
  return _cifar_resnet(32, num_classes, **kwargs)


def ResNet44(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR ResNet-44 (7 BasicBlocks per stage): 661,338 params with 10 classes."""
  return _cifar_resnet(44, num_classes, **kwargs)


def ResNet56(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR ResNet-56 (9 BasicBlocks per stage): 855,770 params with 10 classes."""
  return _cifar_resnet(56, num_classes, **kwargs)


def ResNet110(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """CIFAR ResNet-110 (18 BasicBlocks per stage): 1,730,714 params with 10 classes."""
  return _cifar_resnet(110, num_classes, **kwargs)


def CifarResNet18(num_classes: int = 10, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ResNet-18 for 32x32 images: 3x3 stride-1 stem, no max-pool; 11,173,962 params (10 classes)."""
  return ResNet(
      stage_sizes=(2, 2, 2, 2),
      widths=(64, 128, 256, 512),
      block_cls=BasicBlock,
      num_classes=num_classes,
      stem="cifar",
      **kwargs,
  )


def _imagenet_resnet(stage_sizes, block_cls, num_classes, **kwargs) -> ResNet:
  return ResNet(
      stage_sizes=stage_sizes,
      widths=(64, 128, 256, 512),
      block_cls=block_cls,
      num_classes=num_classes,
      stem="imagenet",
      **kwargs,
  )


def ResNet18(num_classes: int = 1000, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ImageNet ResNet-18: 11,689,512 params with 1000 classes (torchvision's count)."""
  return _imagenet_resnet((2, 2, 2, 2), BasicBlock, num_classes, **kwargs)


def ResNet34(num_classes: int = 1000, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ImageNet ResNet-34: 21,797,672 params with 1000 classes."""
  return _imagenet_resnet((3, 4, 6, 3), BasicBlock, num_classes, **kwargs)


def ResNet50(num_classes: int = 1000, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ImageNet ResNet-50 v1.5: 25,557,032 params with 1000 classes (torchvision's count).

  54 prunable kernels: 53 convs (stem, 48 in bottlenecks, 4 shortcuts) and the head.
  """
  return _imagenet_resnet((3, 4, 6, 3), Bottleneck, num_classes, **kwargs)


def ResNet101(num_classes: int = 1000, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ImageNet ResNet-101 v1.5: 44,549,160 params with 1000 classes."""
  return _imagenet_resnet((3, 4, 23, 3), Bottleneck, num_classes, **kwargs)


def ResNet152(num_classes: int = 1000, **kwargs) -> ResNet:  # pylint: disable=invalid-name
  """ImageNet ResNet-152 v1.5: 60,192,808 params with 1000 classes."""
  return _imagenet_resnet((3, 8, 36, 3), Bottleneck, num_classes, **kwargs)
