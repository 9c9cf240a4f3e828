"""Tests for cram_jax.models.convert: name tables, round trips and error reports."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy

from cram_jax.models import bert as B
from cram_jax.models import convert, resnet

CONFIG = B.BertConfig(
    vocab_size=37,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=12,
    max_position_embeddings=16,
    type_vocab_size=2,
)
MODEL = B.BertForQuestionAnswering(CONFIG)


def random_like(abstract, seed=0):
  """Random values for every leaf (biases and norms too, so swapped leaves show).

  Conversion never runs the model, so shapes from ``jax.eval_shape`` and numpy noise
  stand in for a real init (which would cost an XLA compile).
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract
  )


@pytest.fixture(scope="module")
def params():
  return random_like(convert.bert_abstract_params(MODEL))


@pytest.fixture(scope="module")
def target():
  return convert.bert_abstract_params(MODEL)


@pytest.fixture
def hf_file(tmp_path, params):
  file = tmp_path / "qa.safetensors"
  convert.save_bert(file, params)
  return file


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_uses_hugging_face_names_and_layouts(params):
  state = convert.export_bert(params)
  h, ffn = CONFIG.hidden_size, CONFIG.intermediate_size
  assert state["bert.encoder.layer.0.attention.self.query.weight"].shape == (
      h,
      h,
  )
  assert state["bert.encoder.layer.1.intermediate.dense.weight"].shape == (
      ffn,
      h,
  )
  assert state["bert.encoder.layer.1.output.dense.weight"].shape == (h, ffn)
  assert state["bert.embeddings.LayerNorm.weight"].shape == (h,)
  assert state["qa_outputs.weight"].shape == (2, h)
  np.testing.assert_array_equal(
      state["bert.encoder.layer.1.intermediate.dense.weight"],
      np.asarray(
          params["bert"]["encoder"]["layer_1"]["intermediate"]["kernel"]
      ).T,
  )
  # 5 embedding leaves + 16 per layer + 2 for the head; the QA model has no pooler.
  assert len(state) == 5 + 16 * CONFIG.num_hidden_layers + 2
  assert not any(k.startswith("bert.pooler") for k in state)


def test_round_trip_through_safetensors(hf_file, params, target):
  loaded = convert.load_bert(hf_file, target)
  assert_trees_equal(loaded, params)
  again = convert.export_bert(loaded)
  on_disk = safetensors_numpy.load_file(str(hf_file))
  assert set(again) == set(on_disk)
  for k in on_disk:
    np.testing.assert_array_equal(again[k], on_disk[k])


def test_accepts_missing_bert_prefix_and_legacy_layer_norm_names(
    hf_file, params, target
):
  state = safetensors_numpy.load_file(str(hf_file))
  legacy = {}
  for k, v in state.items():
    k = k.removeprefix("bert.")
    k = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k)
    k = re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)
    legacy[k] = v
  legacy["embeddings.position_ids"] = np.arange(16)[
      None
  ]  # old HF buffer, skipped
  assert_trees_equal(convert.import_bert(legacy, target), params)


def test_encoder_checkpoint_loads_into_encoder_model(params):
  encoder = B.BertModel(CONFIG, add_pooling_layer=False)
  state = {
      k: v
      for k, v in convert.export_bert(params).items()
      if k.startswith("bert.")
  }
  loaded = convert.import_bert(state, convert.bert_abstract_params(encoder))
  assert_trees_equal(loaded, params["bert"])
  assert all(not k.startswith("bert.") for k in convert.export_bert(loaded))


def test_missing_key_is_named(hf_file, target):
  state = safetensors_numpy.load_file(str(hf_file))
  del state["bert.encoder.layer.1.output.dense.weight"]
  with pytest.raises(
      ValueError,
      match=r"missing keys \(1\): 'bert\.encoder\.layer\.1\.output"
      r"\.dense\.weight' \(for 'bert/encoder/layer_1/output/kernel'\)",
  ):
    convert.import_bert(state, target)


def test_unexpected_key_is_named(hf_file, target):
  state = safetensors_numpy.load_file(str(hf_file))
  state["bert.encoder.layer.2.output.dense.bias"] = np.zeros(
      8, np.float32
  )  # a third layer
  state["cls.predictions.bias"] = np.zeros(37, np.float32)
  with pytest.raises(ValueError) as info:
    convert.import_bert(state, target)
  message = str(info.value)
  assert "unexpected keys (2)" in message
  assert (
      "'bert.encoder.layer.2.output.dense.bias' (-> 'bert/encoder/layer_2/output/bias', "
      "not in the model)"
  ) in message
  assert "'cls.predictions.bias'" in message
  assert "missing" not in message
  convert.import_bert(state, target, ignore=(r"^cls\.", r"\.layer\.2\."))


def test_wrong_shape_names_key_and_both_shapes(hf_file, target):
  state = safetensors_numpy.load_file(str(hf_file))
  state["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros(
      (8, 9), np.float32
  )
  state["qa_outputs.weight"] = np.zeros(
      (8, 2), np.float32
  )  # forgot the transpose
  with pytest.raises(ValueError) as info:
    convert.import_bert(state, target)
  message = str(info.value)
  assert (
      "'bert.encoder.layer.0.attention.self.query.weight': checkpoint shape (8, 9), "
      "model expects (8, 8)"
  ) in message
  assert (
      "'qa_outputs.weight': checkpoint shape (8, 2), model expects (2, 8)"
      in message
  )
  assert "wrong shapes (2)" in message


def test_all_problems_reported_together(hf_file, target):
  state = safetensors_numpy.load_file(str(hf_file))
  del state["qa_outputs.bias"]
  state["pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  state["bert.embeddings.word_embeddings.weight"] = np.zeros(
      (36, 8), np.float32
  )
  with pytest.raises(ValueError) as info:
    convert.import_bert(state, target)
  message = str(info.value)
  assert "missing keys (1): 'qa_outputs.bias'" in message
  assert (
      "unexpected keys (1): 'pooler.dense.weight' (-> 'bert/pooler/kernel'"
      in message
  )
  assert (
      "'bert.embeddings.word_embeddings.weight': checkpoint shape (36, 8)"
      in message
  )


def test_pretraining_checkpoint_into_qa_model_with_fresh_head(params):
  pretrained = {
      k: v
      for k, v in convert.export_bert(params).items()
      if k.startswith("bert.")
  }
  pretrained["bert.pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  pretrained["bert.pooler.dense.bias"] = np.zeros(8, np.float32)
  pretrained["cls.predictions.transform.dense.weight"] = np.zeros(
      (8, 8), np.float32
  )
  fresh = jax.tree.map(jnp.zeros_like, params)
  loaded = convert.import_bert(
      pretrained,
      fresh,
      ignore=convert.PRETRAINING_HEADS,
      allow_missing=(r"^qa_outputs/",),
  )
  assert_trees_equal(loaded["bert"], params["bert"])
  assert not np.any(loaded["qa_outputs"]["kernel"])
  # With shapes only there is no value to keep.
  with pytest.raises(
      ValueError, match="allowed missing, but target holds only its shape"
  ):
    convert.import_bert(
        pretrained,
        convert.bert_abstract_params(MODEL),
        ignore=convert.PRETRAINING_HEADS,
        allow_missing=(r"^qa_outputs/",),
    )


def test_half_precision_checkpoint_is_cast_to_param_dtype(
    hf_file, params, target
):
  state = {
      k: v.astype(np.float16)
      for k, v in safetensors_numpy.load_file(str(hf_file)).items()
  }
  loaded = convert.import_bert(state, target)
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(
      loaded["qa_outputs"]["kernel"], params["qa_outputs"]["kernel"], atol=1e-3
  )


def test_variables_dict_is_refused_with_a_hint(params):
  with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
    convert.export_bert({"params": params})


def test_rule_templates():
  rule = convert.Rule(
      "a.{i}.{w:query|key}.weight", "a_{i}/{w:query|key}/kernel", convert.LINEAR
  )
  assert rule.match_theirs("a.3.key.weight") == "a_3/key/kernel"
  assert rule.match_theirs("a.3.out.weight") is None
  assert rule.match_theirs("a.x.key.weight") is None
  assert rule.match_ours("a_12/query/kernel") == "a.12.query.weight"
  with pytest.raises(ValueError, match="must use the same fields"):
    convert.Rule("a.{i}.weight", "a/kernel")
  x = np.arange(24.0).reshape(2, 3, 4, 1)  # (O, I, kh, kw)
  ours = convert.CONV.to_ours(x)
  assert ours.shape == (4, 1, 3, 2)
  np.testing.assert_array_equal(convert.CONV.to_theirs(ours), x)
  assert convert.CONV.theirs_shape(ours.shape) == x.shape


def test_torchvision_resnet50_names_and_shapes():
  model = resnet.ResNet50()
  abstract = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
      )
  )
  state = convert.export_torchvision_resnet(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  )
  # torchvision's resnet50().state_dict() has 320 entries, 53 of them num_batches_tracked.
  assert len(state) == 320 - 53
  expected = {
      "conv1.weight": (64, 3, 7, 7),
      "bn1.running_var": (64,),
      "layer1.0.conv1.weight": (64, 64, 1, 1),
      "layer1.0.downsample.0.weight": (256, 64, 1, 1),
      "layer2.0.conv2.weight": (128, 128, 3, 3),
      "layer3.5.bn2.running_mean": (256,),
      "layer4.2.conv3.weight": (2048, 512, 1, 1),
      "layer4.0.downsample.1.weight": (2048,),
      "fc.weight": (1000, 2048),
      "fc.bias": (1000,),
  }
  for name, shape in expected.items():
    assert state[name].shape == shape, name
  assert "layer4.3.conv1.weight" not in state
  state["layer1.0.bn1.num_batches_tracked"] = np.array(0)
  convert.import_torchvision_resnet(state, abstract)


def test_torchvision_round_trip_on_a_small_imagenet_resnet():
  model = resnet.ResNet(
      stage_sizes=(1, 2),
      widths=(4, 8),
      block_cls=resnet.Bottleneck,
      num_classes=5,
  )
  x = jnp.zeros((2, 16, 16, 3))
  variables = random_like(
      jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  )
  state = convert.export_torchvision_resnet(variables)
  assert (
      "layer2.1.conv3.weight" in state and "layer2.2.conv3.weight" not in state
  )
  loaded = convert.import_torchvision_resnet(state, variables)
  assert_trees_equal(loaded, variables)
  del state["layer2.1.bn3.running_var"]
  with pytest.raises(
      ValueError,
      match=r"'layer2\.1\.bn3\.running_var' \(for "
      r"'batch_stats/stage2_block2/bn3/var'\)",
  ):
    convert.import_torchvision_resnet(state, variables)


# ------------------------------------------------------- errors on bad inputs


def _torch_zip(path):
  # What torch.save writes since 1.6: a zip archive holding a pickle.
  import zipfile

  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")


def _torch_pickle(path):
  path.write_bytes(b"\x80\x02}q\x00.")  # legacy torch.save: a bare pickle


def _truncated(path, good):
  data = good.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # header intact, tensors cut


def _short(path, good):
  path.write_bytes(good.read_bytes()[:5])


def _json(path):
  path.write_text('{"hidden_size": 768}')


@pytest.mark.parametrize(
    "name, write, expected",
    [
        (
            "pytorch_model.bin",
            _torch_zip,
            "is a PyTorch \\(pickle\\) checkpoint",
        ),
        ("old.bin", _torch_pickle, "is a PyTorch \\(pickle\\) checkpoint"),
        ("cut.safetensors", _truncated, "is truncated, corrupt or not a"),
        ("short.safetensors", _short, "is truncated or not a safetensors"),
        ("empty.safetensors", lambda p: p.write_bytes(b""), "0 bytes"),
        ("config.json", _json, "is truncated or not a safetensors"),
    ],
)
def test_load_bert_names_a_file_that_is_not_safetensors(
    tmp_path, hf_file, target, name, write, expected
):
  path = tmp_path / name
  if write in (_truncated, _short):
    write(path, hf_file)
  else:
    write(path)
  with pytest.raises(ValueError, match=expected) as info:
    convert.load_bert(path, target)
  assert repr(str(path)) in str(info.value)
  if name.endswith(".bin"):
    assert "safetensors.torch.save_file" in str(info.value)


def test_load_bert_paths(tmp_path, hf_file, params, target):
  missing = tmp_path / "nope.safetensors"
  with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
    convert.load_bert(missing, target)
  with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
    convert.load_bert(None, target)
  # A save_pretrained directory is accepted: its model.safetensors is read.
  saved = tmp_path / "saved"
  saved.mkdir()
  (saved / "model.safetensors").write_bytes(hf_file.read_bytes())
  assert_trees_equal(convert.load_bert(saved, target), params)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="directory without model"):
    convert.load_bert(empty, target)
  (empty / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin, a PyTorch"):
    convert.load_bert(empty, target)
  (empty / "model.safetensors.index.json").write_text("{}")
  with pytest.raises(ValueError, match="sharded checkpoint"):
    convert.load_bert(empty, target)
  with pytest.raises(FileNotFoundError, match="no directory"):
    convert.save_bert(tmp_path / "no" / "x.safetensors", params)
  with pytest.raises(FileNotFoundError, match="it is a directory"):
    convert.save_bert(saved, params)


def test_pattern_options(hf_file, params, target):
  state = safetensors_numpy.load_file(str(hf_file))
  state["cls.predictions.bias"] = np.zeros(37, np.float32)
  # One string is one regex (it used to be split into characters).
  assert_trees_equal(
      convert.import_bert(state, target, ignore=r"^cls\."), params
  )
  assert_trees_equal(
      convert.load_bert(hf_file, target, ignore=r"^cls\."), params
  )
  with pytest.raises(ValueError, match=r"ignore pattern '\(' is not a valid"):
    convert.import_bert(state, target, ignore=["("])
  with pytest.raises(TypeError, match="allow_missing holds int 1"):
    convert.import_bert(state, target, allow_missing=[r"^x", 1])
  with pytest.raises(TypeError, match="ignore must be a regex string or a"):
    convert.import_bert(state, target, ignore=3)


def test_trees_of_the_wrong_model(params):
  rn = resnet.ResNet(
      stage_sizes=(1,), widths=(4,), block_cls=resnet.BasicBlock, num_classes=3
  )
  rn_vars = jax.eval_shape(
      lambda: rn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  )
  bert_state = convert.export_bert(params)
  with pytest.raises(ValueError) as info:
    convert.import_bert(bert_state, rn_vars["params"])
  message = str(info.value)
  assert "none of the checkpoint's 39 names maps onto the model's" in message
  assert "'conv_init/kernel' (no rule maps it)" in message
  with pytest.raises(
      ValueError, match="another model's tree.*conv_init/kernel"
  ):
    convert.export_bert(rn_vars["params"])
  with pytest.raises(ValueError, match=r"top-level keys \['embeddings'"):
    convert.export_torchvision_resnet(params["bert"])
  with pytest.raises(ValueError, match="whole variables"):
    convert.import_torchvision_resnet({}, rn_vars["params"])
  with pytest.raises(ValueError) as info:
    convert.import_torchvision_resnet(bert_state, rn_vars)
  assert "none of the checkpoint's 39 names" in str(info.value)
  assert "'bert.embeddings.word_embeddings.weight'" in str(info.value)
  with pytest.raises(TypeError, match="must be a mapping of names to arrays"):
    convert.import_bert(list(bert_state), params)
  with pytest.raises(TypeError, match="bert_abstract_params: model must be"):
    convert.bert_abstract_params(rn)


def test_safetensors_header_length_ending_in_0x80_is_not_a_pickle(tmp_path):
  # The header length is little-endian, so a length like 0x980 starts the file
  # with 0x80, a pickle's first opcode; one file in 32 has such a length.
  import json

  values = np.arange(6, dtype=np.float32).reshape(2, 3)
  header = json.dumps(
      {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
  ).encode()
  header += b" " * (0x980 - len(header))  # the format allows space padding
  path = tmp_path / "padded.safetensors"
  path.write_bytes(
      len(header).to_bytes(8, "little") + header + values.tobytes()
  )
  assert path.read_bytes()[0] == 0x80
  assert convert.checkpoint_file(path) == str(path)
  np.testing.assert_array_equal(
      safetensors_numpy.load_file(str(path))["w"], values
  )
