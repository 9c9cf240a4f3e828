"""Tests for cram_jax.models.bert, with Hugging Face's FlaxBert* as the reference.

transformers (pinned in requirements-dev.txt) is imported here only, offline: its Flax
models are built from a random config, nothing is downloaded. Their weights go through
a safetensors file with PyTorch names and our converter, so the test covers the names
and layouts of real HF checkpoints as well as the model's numerics.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cram_jax.compress.select import path_str, selected
from cram_jax.models import bert as B
from cram_jax.models import convert

VOCAB, HIDDEN, LAYERS, HEADS, FFN, MAX_POS, TYPES = 61, 16, 2, 4, 24, 20, 2
SMALL = B.BertConfig(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    max_position_embeddings=MAX_POS,
    type_vocab_size=TYPES,
)


@pytest.fixture(scope="module")
def transformers():
  with pytest.MonkeyPatch.context() as mp:
    # Set before the first import (huggingface_hub reads them then) and kept while the
    # module's tests run.
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_VERBOSITY", "error")
    import transformers  # pylint: disable=import-outside-toplevel  # test-only pin

    yield transformers


def hf_state_dict(flax_params):
  """PyTorch names and layouts for HF Flax BERT params.

  HF's Flax modules are named like its PyTorch ones; only the leaf names and the Linear
  layout differ (kernel (in, out) vs weight (out, in); scale/embedding vs weight).
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(flax_params)[0]:
    *module, name = path_str(path).split("/")
    leaf = np.asarray(leaf)
    if name == "kernel":
      name, leaf = "weight", leaf.T
    elif name in ("scale", "embedding"):
      name = "weight"
    out[".".join(module + [name])] = np.ascontiguousarray(leaf)
  return out


def batch(seed=0, length=9):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (3, length)).astype(np.int32)
  types = rng.integers(0, TYPES, (3, length)).astype(np.int32)
  mask = np.ones((3, length), np.int32)
  mask[1, 6:] = 0  # padded tail
  mask[2, 2:] = 0  # mostly padding
  return ids, mask, types


def through_safetensors(tmp_path, hf_model, ours):
  """Writes the HF model's weights with PyTorch names and loads them into ``ours``."""
  file = tmp_path / "model.safetensors"
  import safetensors.numpy as safetensors_numpy  # pylint: disable=import-outside-toplevel

  state = hf_state_dict(hf_model.params)
  safetensors_numpy.save_file(state, str(file))
  return convert.load_bert(file, convert.bert_abstract_params(ours)), state


def hf_config(transformers):
  return transformers.BertConfig(
      vocab_size=VOCAB,
      hidden_size=HIDDEN,
      num_hidden_layers=LAYERS,
      num_attention_heads=HEADS,
      intermediate_size=FFN,
      max_position_embeddings=MAX_POS,
      type_vocab_size=TYPES,
      hidden_act="gelu",
  )


def test_config_from_hf_matches(transformers):
  assert B.BertConfig.from_hf(hf_config(transformers).to_dict()) == SMALL


def test_encoder_matches_transformers(transformers, tmp_path):
  reference = transformers.FlaxBertModel(hf_config(transformers), seed=1)
  model = B.BertModel(SMALL)
  params, state = through_safetensors(tmp_path, reference, model)
  assert (
      "encoder.layer.1.attention.self.query.weight" in state
  )  # real PyTorch names
  ids, mask, types = batch()
  ref = reference(ids, attention_mask=mask, token_type_ids=types)
  out = jax.jit(
      lambda p: model.apply({"params": p}, ids, mask, types, train=False)
  )(params)
  assert np.abs(out.sequence_output - ref.last_hidden_state).max() <= 1e-5
  assert np.abs(out.pooled_output - ref.pooler_output).max() <= 1e-5


def test_question_answering_matches_transformers(transformers, tmp_path):
  reference = transformers.FlaxBertForQuestionAnswering(
      hf_config(transformers), seed=2
  )
  model = B.BertForQuestionAnswering(SMALL)
  params, state = through_safetensors(tmp_path, reference, model)
  assert (
      "qa_outputs.weight" in state
      and "bert.embeddings.word_embeddings.weight" in state
  )
  ids, mask, types = batch(seed=1)
  ref = reference(ids, attention_mask=mask, token_type_ids=types)
  start, end = jax.jit(
      lambda p: model.apply({"params": p}, ids, mask, types, train=False)
  )(params)
  assert start.shape == end.shape == (3, 9)
  assert np.abs(start - ref.start_logits).max() <= 1e-5
  assert np.abs(end - ref.end_logits).max() <= 1e-5


def test_sequence_classification_matches_transformers(transformers, tmp_path):
  config = hf_config(transformers)
  config.num_labels = 3
  reference = transformers.FlaxBertForSequenceClassification(config, seed=3)
  model = B.BertForSequenceClassification(SMALL, num_labels=3)
  params, _ = through_safetensors(tmp_path, reference, model)
  ids, mask, types = batch(seed=2)
  ref = reference(ids, attention_mask=mask, token_type_ids=types)
  logits = model.apply({"params": params}, ids, mask, types, train=False)
  assert np.abs(logits - ref.logits).max() <= 1e-5


@pytest.fixture(scope="module")
def qa_params():
  model = B.BertForQuestionAnswering(SMALL)
  ids = jnp.zeros((1, 4), jnp.int32)
  return (
      model,
      jax.jit(lambda k: model.init(k, ids, train=False))(jax.random.key(0))[
          "params"
      ],
  )


def test_padding_does_not_leak_into_real_tokens(qa_params):
  model, params = qa_params
  ids, mask, types = batch(seed=3)
  noisy = ids.copy()
  noisy[mask == 0] = (noisy[mask == 0] + 7) % VOCAB  # change only padded tokens
  apply = jax.jit(
      lambda i: model.apply({"params": params}, i, mask, types, train=False)
  )
  (s1, e1), (s2, e2) = apply(ids), apply(noisy)
  keep = mask == 1
  np.testing.assert_allclose(
      np.asarray(s1)[keep], np.asarray(s2)[keep], atol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(e1)[keep], np.asarray(e2)[keep], atol=1e-6
  )
  assert not np.allclose(np.asarray(s1)[~keep], np.asarray(s2)[~keep])


def test_dropout_only_in_train_mode(qa_params):
  model, params = qa_params
  ids, mask, types = batch()
  apply = jax.jit(
      lambda k, train: model.apply(
          {"params": params}, ids, mask, types, train=train, rngs={"dropout": k}
      ),
      static_argnums=1,
  )
  a, b = apply(jax.random.key(0), True), apply(jax.random.key(1), True)
  assert not np.allclose(a[0], b[0])
  e1, e2 = apply(jax.random.key(0), False), apply(jax.random.key(1), False)
  np.testing.assert_array_equal(e1[0], e2[0])
  no_drop = B.BertForQuestionAnswering(
      B.BertConfig(
          **{
              **SMALL.__dict__,
              "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0,
          }
      )
  )
  z = no_drop.apply(
      {"params": params},
      ids,
      mask,
      types,
      train=True,
      rngs={"dropout": jax.random.key(0)},
  )
  np.testing.assert_allclose(z[0], e1[0], atol=1e-6)


def test_bfloat16_compute(qa_params):
  _, params = qa_params
  model = B.BertModel(SMALL, add_pooling_layer=False, dtype=jnp.bfloat16)
  fresh = convert.bert_abstract_params(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {
      jnp.dtype(jnp.float32)
  }
  ids, mask, types = batch()
  out = model.apply({"params": params["bert"]}, ids, mask, types, train=False)
  assert out.sequence_output.dtype == jnp.bfloat16
  start, _ = B.BertForQuestionAnswering(SMALL, dtype=jnp.bfloat16).apply(
      {"params": params}, ids, mask, types, train=False
  )
  assert start.dtype == jnp.float32


@pytest.mark.parametrize(
    "model",
    [
        B.BertForQuestionAnswering(SMALL),
        B.BertForSequenceClassification(SMALL, num_labels=3),
        B.BertModel(SMALL),
    ],
    ids=["qa", "cls", "encoder"],
)
def test_prunable_selection_is_the_six_encoder_kernels_per_layer(model):
  params = convert.bert_abstract_params(model)
  paths = [p for p, _ in selected(params, B.BERT_PRUNABLE)]
  assert len(paths) == 6 * LAYERS
  prefix = "bert/" if "bert" in params else ""
  expected = {
      f"{prefix}encoder/layer_{i}/{name}/kernel"
      for i in range(LAYERS)
      for name in (
          "attention/query",
          "attention/key",
          "attention/value",
          "attention/out",
          "intermediate",
          "output",
      )
  }
  assert set(paths) == expected
  for p in paths:
    assert not any(
        part in p
        for part in ("embeddings", "pooler", "qa_outputs", "classifier")
    )
  # Same set on the full variables dict.
  assert [p for p, _ in selected({"params": params}, B.BERT_PRUNABLE)] == [
      "params/" + p for p in paths
  ]


def test_presets_have_the_published_sizes():
  def count(m):
    return sum(
        math.prod(x.shape)
        for x in jax.tree.leaves(convert.bert_abstract_params(m))
    )

  assert count(B.BertModel(B.BertConfig.base())) == 109_482_240
  assert count(B.BertModel(B.BertConfig.large())) == 335_141_888
  tiny = B.BertConfig.tiny()
  assert (
      tiny.hidden_size,
      tiny.num_hidden_layers,
      tiny.num_attention_heads,
  ) == (128, 2, 2)
  assert B.BertConfig.base(vocab_size=100).vocab_size == 100


def test_invalid_configs_and_inputs_raise():
  with pytest.raises(
      ValueError, match="hidden_size=10 is not a multiple of num_attention"
  ):
    B.BertConfig(hidden_size=10, num_attention_heads=3)
  with pytest.raises(ValueError, match="hidden_dropout_prob must be in"):
    B.BertConfig(hidden_dropout_prob=1.0)
  with pytest.raises(
      ValueError, match="num_hidden_layers must be a positive int, got 0"
  ):
    B.BertConfig(num_hidden_layers=0)
  with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
    B.BertConfig.from_hf({"hidden_act": "gelu_new"})
  model = B.BertModel(SMALL)
  with pytest.raises(
      ValueError, match="sequence length 21 exceeds max_position_embeddings=20"
  ):
    jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, 21), jnp.int32), train=False
        )
    )
  with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
    jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((4,), jnp.int32), train=False
        )
    )


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        (
            "hidden_size",
            768.0,
            TypeError,
            "hidden_size must be a positive int, got float",
        ),
        (
            "num_hidden_layers",
            True,
            TypeError,
            "num_hidden_layers must be a positive int, got bool",
        ),
        (
            "vocab_size",
            -1,
            ValueError,
            "vocab_size must be a positive int, got -1",
        ),
        (
            "hidden_dropout_prob",
            "0.1",
            TypeError,
            "hidden_dropout_prob must be a float, got str",
        ),
        (
            "attention_probs_dropout_prob",
            -0.1,
            ValueError,
            r"attention_probs_dropout_prob must be in \[0, 1\)",
        ),
        (
            "layer_norm_eps",
            0.0,
            ValueError,
            "layer_norm_eps must be > 0, got 0.0",
        ),
        (
            "initializer_range",
            -0.02,
            ValueError,
            "initializer_range must be >= 0",
        ),
    ],
)
def test_bad_config_fields_are_named(field, value, error, message):
  with pytest.raises(error, match=message):
    B.BertConfig(**{field: value})


def test_bad_modules_and_inputs_are_named():
  with pytest.raises(TypeError, match="from_hf: pass the parsed config.json"):
    B.BertConfig.from_hf("config.json")
  with pytest.raises(TypeError, match="BertModel: config must be a BertConfig"):
    B.BertModel(None)
  with pytest.raises(TypeError, match="BertForQuestionAnswering: config must"):
    B.BertForQuestionAnswering({"hidden_size": 8})
  with pytest.raises(TypeError, match="dtype='bf16' is not a dtype"):
    B.BertForQuestionAnswering(SMALL, dtype="bf16")
  with pytest.raises(
      ValueError, match="num_labels must be a positive int, got 0"
  ):
    B.BertForSequenceClassification(SMALL, num_labels=0)
  with pytest.raises(
      TypeError, match="num_labels must be a positive int, got float"
  ):
    B.BertForSequenceClassification(SMALL, num_labels=2.0)
  with pytest.raises(
      TypeError, match="input_ids must be integer token ids, got dtype float32"
  ):
    jax.eval_shape(
        lambda: B.BertModel(SMALL).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.float32), train=False
        )
    )
