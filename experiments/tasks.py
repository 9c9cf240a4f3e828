"""What differs between experiments: the model, its loss, and its evaluation.

A :class:`Task` bundles a Flax model built from the config with three pure
functions the trainer compiles: ``loss`` (train mode, returns new BatchNorm
statistics), ``eval_outputs`` (eval mode, per batch) and ``summarise`` (host side,
turns the collected outputs into metrics). Vision classification (ResNets) and
SQuAD span prediction (BERT) are provided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cram_jax import models
from cram_jax.compress import Selection
from cram_jax.data import (
    open_source,
    postprocess_squad,
    squad_metric,
    squad_references,
)
from cram_jax.models import convert

Batch = Mapping[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Task:
  """A model and how to train and evaluate it.

  Attributes:
    model: the Flax module.
    select: the leaves CrAM and one-shot pruning compress.
    uniform_select: the selection for layer-wise (uniform) pruning.
    has_batch_stats: the model has BatchNorm (BN re-estimation applies).
    inputs: batch keys fed to the model, in order.
    metric: the headline evaluation metric (e.g. ``accuracy``, ``f1``).
  """

  model: nn.Module
  select: Selection
  uniform_select: Selection
  has_batch_stats: bool
  inputs: tuple[str, ...]
  metric: str
  loss_and_metrics: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  eval_outputs: Callable[[Any, Batch], dict[str, jax.Array]]
  summarise: Callable[[Sequence[dict[str, np.ndarray]]], dict[str, float]]

  def model_inputs(self, batch: Batch) -> tuple[Any, ...]:
    return tuple(batch[k] for k in self.inputs)

  def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]:
    sample = tuple(x[:1] for x in self.model_inputs(batch))
    return dict(
        self.model.init({"params": rng, "dropout": rng}, *sample, train=False)
    )

  def loss(self, params: Any, batch_stats: Any, batch: Batch, rng: jax.Array):
    """Train-mode loss; returns ``(loss, (new_batch_stats, metrics))``."""
    variables = {"params": params}
    mutable = []
    if self.has_batch_stats:
      variables["batch_stats"] = batch_stats
      mutable = ["batch_stats"]
    outputs, updates = self.model.apply(
        variables,
        *self.model_inputs(batch),
        train=True,
        mutable=mutable,
        rngs={"dropout": rng},
    )
    loss, metrics = self.loss_and_metrics(outputs, batch)
    return loss, (updates.get("batch_stats", batch_stats), metrics)


# ------------------------------------------------------------------ vision


def _classification_loss(logits, batch):
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
  }


def vision_task(
    config: ml_collections.ConfigDict, bn_axis_name: str | None
) -> Task:
  factory = getattr(models, config.model, None)
  if factory is None or not callable(factory):
    raise ValueError(
        f"config.model={config.model!r} is not a model of cram_jax.models"
    )
  model = factory(
      num_classes=config.num_classes,
      dtype=DTYPES[config.dtype],
      bn_axis_name=bn_axis_name,
      **dict(config.model_kwargs),
  )

  def eval_outputs(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    weight = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]
    )
    return {
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * weight),
        "loss": jnp.sum(losses * weight),
        "count": jnp.sum(weight),
    }

  def summarise(outputs):
    total = {
        k: float(sum(np.sum(o[k]) for o in outputs))
        for k in ("correct", "loss", "count")
    }
    count = max(total["count"], 1.0)
    return {
        "accuracy": total["correct"] / count,
        "loss": total["loss"] / count,
        "examples": int(round(total["count"])),
    }

  return Task(
      model=model,
      select=models.RESNET_PRUNABLE,
      uniform_select=models.RESNET_UNIFORM,
      has_batch_stats=True,
      inputs=("image",),
      metric="accuracy",
      loss_and_metrics=_classification_loss,
      eval_outputs=eval_outputs,
      summarise=summarise,
  )


# ------------------------------------------------------------------ SQuAD


def _span_loss(outputs, batch):
  start_logits, end_logits = outputs
  start = optax.softmax_cross_entropy_with_integer_labels(
      start_logits, batch["start_positions"]
  )
  end = optax.softmax_cross_entropy_with_integer_labels(
      end_logits, batch["end_positions"]
  )
  loss = 0.5 * (start.mean() + end.mean())
  exact = (jnp.argmax(start_logits, -1) == batch["start_positions"]) & (
      jnp.argmax(end_logits, -1) == batch["end_positions"]
  )
  return loss, {"loss": loss, "span_accuracy": exact.mean()}


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
  """``T^2 * KL(teacher || student)`` of the softened distributions, batch mean.

  ``softmax(logits / T)`` over the last axis for both; the ``T^2`` factor keeps
  the gradient's scale independent of ``T`` (Hinton et al., 2015). The
  teacher's logits get no gradient.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  log_teacher = jax.nn.log_softmax(
      teacher_logits.astype(jnp.float32) / temperature, axis=-1
  )
  log_student = jax.nn.log_softmax(
      student_logits.astype(jnp.float32) / temperature, axis=-1
  )
  kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
  return temperature**2 * jnp.mean(kl)


def teacher_checkpoint(config: ml_collections.ConfigDict) -> str:
  """``config.distill.teacher_checkpoint``, '' when distillation is off (or the
  config predates the field)."""
  distill = config.get("distill")
  return distill.teacher_checkpoint if distill is not None else ""


def check_teacher_checkpoint(path: str) -> str:
  """The safetensors file of a teacher path; raises FileNotFoundError or
  ValueError naming ``config.distill.teacher_checkpoint`` and the path."""
  return convert.checkpoint_file(path, "config.distill.teacher_checkpoint")


def bert_config(config: ml_collections.ConfigDict) -> models.BertConfig:
  preset = getattr(models.BertConfig, config.bert.size)
  return preset(**dict(config.bert.overrides))


def squad_task(
    config: ml_collections.ConfigDict, bn_axis_name: str | None
) -> Task:
  del bn_axis_name  # BERT has no BatchNorm
  model = models.BertForQuestionAnswering(
      bert_config(config), dtype=DTYPES[config.dtype]
  )
  examples_cache: dict[str, Any] = {}
  teacher_path = teacher_checkpoint(config)
  teacher_cache: dict[str, Any] = {}

  def teacher_params():
    # Read once, when the train step is first traced (never for evaluation);
    # the teacher has the student's architecture and a fine-tuned QA head.
    if "params" not in teacher_cache:
      teacher_cache["params"] = jax.device_put(
          models.load_bert(
              teacher_path,
              models.bert_abstract_params(model),
              ignore=models.PRETRAINING_HEADS,
          )
      )
    return teacher_cache["params"]

  def distilled_loss(outputs, batch):
    hard, metrics = _span_loss(outputs, batch)
    teacher = model.apply(
        {"params": teacher_params()},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        train=False,
    )
    temperature = config.distill.temperature
    soft = 0.5 * sum(
        distillation_loss(s, t, temperature) for s, t in zip(outputs, teacher)
    )
    weight = config.distill.weight
    loss = (1.0 - weight) * hard + weight * soft
    return loss, {
        **metrics,
        "loss": loss,
        "hard_loss": hard,
        "distill_loss": soft,
    }

  def eval_outputs(variables, batch):
    start, end = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        train=False,
    )
    return {"start_logits": start, "end_logits": end}

  def summarise(outputs):
    if "examples" not in examples_cache:
      examples_cache["examples"] = open_source(
          config.dataset, config.eval_split, data_dir=config.data_dir
      )
    examples = examples_cache["examples"]
    cat = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    predictions = postprocess_squad(
        examples,
        cat["example_index"],
        cat["offsets"],
        cat["token_is_max_context"],
        cat["start_logits"],
        cat["end_logits"],
    )
    scores = squad_metric.evaluate(predictions, squad_references(examples))
    # Fractions, like accuracy (the official script prints percent).
    return {
        "exact_match": scores["exact_match"] / 100,
        "f1": scores["f1"] / 100,
        "examples": int(scores["num_questions"]),
    }

  return Task(
      model=model,
      select=models.BERT_PRUNABLE,
      uniform_select=models.BERT_PRUNABLE,
      has_batch_stats=False,
      inputs=("input_ids", "attention_mask", "token_type_ids"),
      metric="f1",
      loss_and_metrics=distilled_loss if teacher_path else _span_loss,
      eval_outputs=eval_outputs,
      summarise=summarise,
  )


# Batch keys the host keeps next to the eval outputs (for SQuAD's span decoding).
HOST_EVAL_KEYS = ("example_index", "offsets", "token_is_max_context")

TASKS = {"vision": vision_task, "squad": squad_task}


def make_task(
    config: ml_collections.ConfigDict, bn_axis_name: str | None = None
) -> Task:
  if config.task not in TASKS:
    raise ValueError(
        f"config.task={config.task!r} is not one of {sorted(TASKS)}"
    )
  return TASKS[config.task](config, bn_axis_name)


def load_pretrained(config: ml_collections.ConfigDict, params: Any) -> Any:
  """BERT: import `config.init_checkpoint` (Hugging Face safetensors), keeping a fresh QA head."""
  path = config.init_checkpoint
  if not path:
    return params
  return models.load_bert(
      path,
      params,
      ignore=models.PRETRAINING_HEADS,
      allow_missing=(r"^qa_outputs/",),
  )
