"""A BERT encoder with sequence-classification and question-answering heads (Flax Linen).

The architecture is the original post-LayerNorm BERT (Devlin et al. 2019) with the
numerics of the Hugging Face implementation, so its checkpoints load through
:mod:`cram_jax.models.convert` and give the same outputs: exact (erf) GELU, LayerNorm
epsilon 1e-12, learned absolute position and token-type embeddings, a pooler
(dense + tanh on the [CLS] token), dropout after the embeddings, on the attention
probabilities and after each sublayer.

Parameters are laid out as (inside ``variables['params']``)::

  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}
  encoder/layer_{i}/attention_norm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_norm/...
  pooler/{kernel,bias}

with a ``bert/`` prefix inside the task models, whose heads are ``classifier`` and
``qa_outputs``. Dense kernels are ``(in, out)``.

Example::

  config = BertConfig.base()
  model = BertForQuestionAnswering(config)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), train=False)["params"]
  start, end = model.apply({"params": params}, ids, attention_mask=mask, train=False)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cram_jax.compress import validate
from cram_jax.compress.select import Selection

BERT_PRUNABLE = Selection(
    include=r"(^|/)encoder/layer_\d+/(attention/(query|key|value|out)|intermediate|output)/kernel$"
)
"""The encoder's six dense kernels per layer: Q, K, V, attention output, intermediate, output.

Embeddings, the pooler and the task heads stay dense, as in the oBERT recipe (Kurtic et
al. 2022): embeddings are lookups whose rows are not redundant in the way dense kernels
are, and the pooler and heads are tiny. Matches paths with or without a leading
``params/`` or ``bert/``.
"""


def _check_module(owner: str, config: Any, dtype: Any) -> None:
  """Checks a BERT module's fields when it is built, not at its first trace."""
  if not isinstance(config, BertConfig):
    raise TypeError(
        f"{owner}: config must be a BertConfig (e.g. BertConfig.base()), got "
        f"{type(config).__name__} {config!r}"
    )
  try:
    jnp.dtype(dtype)
  except TypeError:
    raise TypeError(
        f"{owner}: dtype={dtype!r} is not a dtype (e.g. jnp.float32, "
        "jnp.bfloat16)"
    ) from None


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes and regularisation of a BERT encoder; field names follow Hugging Face.

  Attributes:
    vocab_size: rows of the word embedding.
    hidden_size: width of the residual stream.
    num_hidden_layers: number of transformer layers.
    num_attention_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward layer.
    max_position_embeddings: longest sequence the position embedding covers.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    hidden_dropout_prob: dropout after the embeddings, each sublayer and the pooler.
    attention_probs_dropout_prob: dropout on the attention probabilities.
    initializer_range: standard deviation of the normal init of kernels and embeddings.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    ):
      validate.check_positive_int(getattr(self, name), name, "BertConfig")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig: hidden_size={self.hidden_size} is not a multiple of "
          f"num_attention_heads={self.num_attention_heads}"
      )
    for name in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "layer_norm_eps",
        "initializer_range",
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"BertConfig: {name} must be a float, got "
            f"{type(value).__name__} {value!r}"
        )
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"BertConfig: {name} must be in [0, 1), got {value!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(
          f"BertConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}"
      )
    if not self.initializer_range >= 0:
      raise ValueError(
          "BertConfig: initializer_range must be >= 0, got "
          f"{self.initializer_range!r}"
      )

  @classmethod
  def tiny(cls, **overrides) -> BertConfig:
    """2 layers, hidden 128, 2 heads (the size of google/bert_uncased_L-2_H-128_A-2)."""
    return cls(
        **{
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 512,
            **overrides,
        }
    )

  @classmethod
  def base(cls, **overrides) -> BertConfig:
    """BERT-base: 12 layers, hidden 768, 12 heads, 110M parameters with the pooler."""
    return cls(**overrides)

  @classmethod
  def large(cls, **overrides) -> BertConfig:
    """BERT-large: 24 layers, hidden 1024, 16 heads, 335M parameters with the pooler."""
    return cls(
        **{
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            **overrides,
        }
    )

  @classmethod
  def from_hf(cls, hf_config: dict[str, Any]) -> BertConfig:
    """Builds a config from a Hugging Face ``config.json`` dict; unknown keys are ignored.

    Raises:
      ValueError: if the checkpoint uses an activation or position embedding this
        implementation does not have.
    """
    if not isinstance(hf_config, Mapping):
      raise TypeError(
          "BertConfig.from_hf: pass the parsed config.json, e.g. "
          "json.load(open('config.json')), got "
          f"{type(hf_config).__name__} {hf_config!r}"
      )
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(
          f"BertConfig.from_hf: hidden_act={act!r} is not supported, only 'gelu'"
      )
    pos = hf_config.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(
          f"BertConfig.from_hf: position_embedding_type={pos!r} is not "
          "supported, only 'absolute'"
      )
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf_config.items() if k in names})


class BertOutput(NamedTuple):
  """What :class:`BertModel` returns.

  Attributes:
    sequence_output: final hidden states, ``(batch, length, hidden_size)``.
    pooled_output: ``tanh(dense(h[:, 0]))``, ``(batch, hidden_size)``; None when the
      model has no pooler.
  """

  sequence_output: jax.Array
  pooled_output: jax.Array | None


def _dense(
    config: BertConfig, features: int, dtype: Any, name: str
) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      name=name,
      kernel_init=nn.initializers.normal(config.initializer_range),
  )


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
  """Sum of word, position and token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, *, train: bool):
    c = self.config
    init = nn.initializers.normal(c.initializer_range)

    def embed(n, name):
      return nn.Embed(
          n, c.hidden_size, embedding_init=init, dtype=self.dtype, name=name
      )

    x = (
        embed(c.vocab_size, "word_embeddings")(input_ids)
        + embed(c.max_position_embeddings, "position_embeddings")(position_ids)
        + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    x = _layer_norm(c, self.dtype, "norm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=not train)


class BertAttention(nn.Module):
  """Multi-head self-attention with separate Q/K/V/output dense layers."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool):
    c = self.config
    heads = c.num_attention_heads
    head_dim = c.hidden_size // heads

    def split(t):
      return t.reshape(t.shape[:-1] + (heads, head_dim))

    q = split(_dense(c, c.hidden_size, self.dtype, "query")(x))
    k = split(_dense(c, c.hidden_size, self.dtype, "key")(x))
    v = split(_dense(c, c.hidden_size, self.dtype, "value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    # Softmax in float32: bf16 scores lose the small differences that matter here.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(
        probs, deterministic=not train
    )
    context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    context = context.reshape(context.shape[:-2] + (c.hidden_size,))
    return _dense(c, c.hidden_size, self.dtype, "out")(context)


class BertLayer(nn.Module):
  """Post-LayerNorm transformer layer: attention, add & norm, GELU MLP, add & norm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool):
    c = self.config
    dropout = nn.Dropout(c.hidden_dropout_prob)
    h = BertAttention(c, self.dtype, name="attention")(
        x, attention_bias, train=train
    )
    x = _layer_norm(c, self.dtype, "attention_norm")(
        x + dropout(h, deterministic=not train)
    )
    h = _dense(c, c.intermediate_size, self.dtype, "intermediate")(x)
    h = nn.gelu(h, approximate=False)
    h = _dense(c, c.hidden_size, self.dtype, "output")(h)
    return _layer_norm(c, self.dtype, "output_norm")(
        x + dropout(h, deterministic=not train)
    )


class BertEncoder(nn.Module):
  """A stack of :class:`BertLayer` named ``layer_0 ... layer_{n-1}``."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, *, train: bool):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(
          x, attention_bias, train=train
      )
    return x


class BertModel(nn.Module):
  """The BERT encoder: embeddings, transformer layers and (optionally) the pooler.

  Attributes:
    config: sizes, see :class:`BertConfig`.
    add_pooling_layer: whether to build the pooler (the QA model has none, as in HF).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the
      attention softmax is computed in float32.
  """

  config: BertConfig
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_module("BertModel", self.config, self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      position_ids=None,
      *,
      train: bool,
  ) -> BertOutput:
    """Encodes a batch of token ids.

    Args:
      input_ids: int ``(batch, length)``.
      attention_mask: ``(batch, length)``, 1 (or True) for tokens to attend to, 0 for
        padding; all ones when None.
      token_type_ids: int ``(batch, length)`` segment ids; zeros when None.
      position_ids: int ``(batch, length)``; ``0 .. length - 1`` when None.
      train: enables dropout (needs a ``'dropout'`` PRNG stream).

    Returns:
      A :class:`BertOutput`.
    """
    c = self.config
    if input_ids.ndim != 2:
      raise ValueError(
          f"BertModel: input_ids must be (batch, length), got shape "
          f"{input_ids.shape}"
      )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(
          f"BertModel: input_ids must be integer token ids, got dtype "
          f"{input_ids.dtype}"
      )
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(
          f"BertModel: sequence length {length} exceeds "
          f"max_position_embeddings={c.max_position_embeddings}"
      )
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    # Additive bias, (batch, 1, 1, key): padded keys get the most negative float32, so
    # they receive exactly zero probability unless a whole row is padding.
    attention_bias = jnp.where(
        attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min
    ).astype(jnp.float32)
    x = BertEmbeddings(c, self.dtype, name="embeddings")(
        input_ids, token_type_ids, position_ids, train=train
    )
    x = BertEncoder(c, self.dtype, name="encoder")(
        x, attention_bias, train=train
    )
    pooled = None
    if self.add_pooling_layer:
      pooled = jnp.tanh(_dense(c, c.hidden_size, self.dtype, "pooler")(x[:, 0]))
    return BertOutput(x, pooled)


class BertForSequenceClassification(nn.Module):
  """BERT with dropout and a dense ``classifier`` on the pooled [CLS] output.

  Attributes:
    config: sizes, see :class:`BertConfig`.
    num_labels: number of classes (1 for regression).
    dtype: compute dtype; logits are returned in float32.
  """

  config: BertConfig
  num_labels: int = 2
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_module("BertForSequenceClassification", self.config, self.dtype)
    validate.check_positive_int(
        self.num_labels, "num_labels", "BertForSequenceClassification"
    )
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      position_ids=None,
      *,
      train: bool,
  ):
    """Returns float32 logits ``(batch, num_labels)``; arguments as :class:`BertModel`."""
    out = BertModel(self.config, dtype=self.dtype, name="bert")(
        input_ids, attention_mask, token_type_ids, position_ids, train=train
    )
    x = nn.Dropout(self.config.hidden_dropout_prob)(
        out.pooled_output, deterministic=not train
    )
    logits = _dense(self.config, self.num_labels, self.dtype, "classifier")(x)
    return logits.astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
  """BERT (without pooler) and a dense ``qa_outputs`` giving SQuAD span logits.

  Attributes:
    config: sizes, see :class:`BertConfig`.
    dtype: compute dtype; logits are returned in float32.
  """

  config: BertConfig
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_module("BertForQuestionAnswering", self.config, self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      position_ids=None,
      *,
      train: bool,
  ):
    """Returns float32 ``(start_logits, end_logits)``, each ``(batch, length)``.

    Arguments as :class:`BertModel`. Padding positions are not masked in the logits;
    mask them in the loss or the span decoder.
    """
    out = BertModel(
        self.config, add_pooling_layer=False, dtype=self.dtype, name="bert"
    )(input_ids, attention_mask, token_type_ids, position_ids, train=train)
    logits = _dense(self.config, 2, self.dtype, "qa_outputs")(
        out.sequence_output
    )
    logits = logits.astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


BERT_MODULES = (
    BertModel,
    BertForSequenceClassification,
    BertForQuestionAnswering,
)
"""The BERT modules whose params :mod:`cram_jax.models.convert` maps."""
