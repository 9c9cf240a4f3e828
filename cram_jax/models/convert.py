"""Importing and exporting PyTorch-named checkpoints (Hugging Face BERT, torchvision ResNet).

A conversion is a table of :class:`Rule` rows, each a checkpoint-name template, a
params-path template and a layout transform. A field (``{i}``: a decimal index,
``{qkv:query|key|value}``: one of the words) appears in both templates, so one table
works in both directions::

  Rule("encoder.layer.{i}.intermediate.dense.weight",
       "encoder/layer_{i}/intermediate/kernel", LINEAR)

Importing checks the checkpoint against the target model's parameter tree (usually
``jax.eval_shape`` of ``model.init``) and reports every problem at once: missing keys,
unexpected keys, wrong shapes. Nothing here imports torch; files are read with
``safetensors.numpy``.

Example::

  model = BertForQuestionAnswering(BertConfig.base())
  target = bert_abstract_params(model)
  params = load_bert("model.safetensors", target, ignore=PRETRAINING_HEADS)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cram_jax.compress.select import path_str
from cram_jax.models import bert as bert_lib


@dataclasses.dataclass(frozen=True)
class Transform:
  """A layout change between a checkpoint tensor (theirs) and our leaf (ours)."""

  name: str
  axes: (
      tuple[int, ...] | None
  )  # permutation theirs -> ours; None keeps the layout

  def to_ours(self, x: np.ndarray) -> np.ndarray:
    return x if self.axes is None else np.transpose(x, self.axes)

  def to_theirs(self, x: np.ndarray) -> np.ndarray:
    return x if self.axes is None else np.transpose(x, np.argsort(self.axes))

  def theirs_shape(self, ours: Sequence[int]) -> tuple[int, ...]:
    ours = tuple(ours)
    return (
        ours
        if self.axes is None
        else tuple(ours[i] for i in np.argsort(self.axes))
    )

  def ndim_ok(self, x: np.ndarray) -> bool:
    return self.axes is None or x.ndim == len(self.axes)


IDENTITY = Transform("identity", None)
LINEAR = Transform(
    "linear", (1, 0)
)  # torch Linear (out, in) -> Flax Dense (in, out)
CONV = Transform(
    "conv", (2, 3, 1, 0)
)  # torch Conv2d (O, I, kh, kw) -> Flax Conv (kh, kw, I, O)


# A field is {name} (a decimal index) or {name:alt|alt} (one of the alternatives).
_FIELD = re.compile(r"\{(\w+)(?::([\w|]+))?\}")


def _compile(template: str) -> tuple[re.Pattern[str], str]:
  """A full-match regex and a ``str.format`` string for a template."""
  regex, fmt, pos = [], [], 0
  for m in _FIELD.finditer(template):
    literal = template[pos : m.start()]
    regex.append(re.escape(literal) + rf"(?P<{m[1]}>{m[2] or r'[0-9]+'})")
    fmt.append(literal.replace("{", "{{").replace("}", "}}") + "{" + m[1] + "}")
    pos = m.end()
  regex.append(re.escape(template[pos:]))
  fmt.append(template[pos:].replace("{", "{{").replace("}", "}}"))
  return re.compile("".join(regex) + r"\Z"), "".join(fmt)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of a conversion table.

  Templates hold fields: ``{i}`` matches a decimal index, ``{qkv:query|key|value}`` one
  of the listed words. Both templates must use the same field names.

  Attributes:
    theirs: checkpoint name template, e.g. ``'encoder.layer.{i}.output.dense.weight'``.
    ours: '/'-joined params path template, e.g. ``'encoder/layer_{i}/output/kernel'``.
    transform: :data:`IDENTITY`, :data:`LINEAR` or :data:`CONV`.
  """

  theirs: str
  ours: str
  transform: Transform = IDENTITY

  def __post_init__(self):
    def fields(t):
      return sorted(m[1] for m in _FIELD.finditer(t))

    if fields(self.theirs) != fields(self.ours):
      raise ValueError(
          f"Rule: templates {self.theirs!r} and {self.ours!r} must use the same "
          "fields"
      )
    object.__setattr__(self, "_theirs", _compile(self.theirs))
    object.__setattr__(self, "_ours", _compile(self.ours))

  def match_theirs(self, name: str) -> str | None:
    """Our path for checkpoint name ``name``, or None when the row does not apply."""
    m = self._theirs[0].match(name)
    return None if m is None else self._ours[1].format(**m.groupdict())

  def match_ours(self, path: str) -> str | None:
    """The checkpoint name for our path ``path``, or None when the row does not apply."""
    m = self._ours[0].match(path)
    return None if m is None else self._theirs[1].format(**m.groupdict())

  def prefixed(self, theirs: str, ours: str) -> Rule:
    """This row under a parent module, e.g. ``prefixed('bert.', 'bert/')``."""
    return Rule(theirs + self.theirs, ours + self.ours, self.transform)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(leaf))


def _lookup(rules: Sequence[Rule], name: str, ours: bool):
  for rule in rules:
    hit = rule.match_ours(name) if ours else rule.match_theirs(name)
    if hit is not None:
      return rule, hit
  return None, None


def _fmt(entries: Sequence[str], limit: int = 20) -> str:
  shown = "; ".join(entries[:limit])
  more = f"; ... ({len(entries) - limit} more)" if len(entries) > limit else ""
  return shown + more


def _patterns(owner: str, option: str, value: Any) -> list[re.Pattern[str]]:
  """Compiles ``ignore=``/``allow_missing=``: one regex string or a sequence of them."""
  if isinstance(value, (str, re.Pattern)):
    value = (value,)  # One pattern, not a sequence of one-character patterns.
  if not isinstance(value, (Sequence, set, frozenset)):
    raise TypeError(
        f"{owner}: {option} must be a regex string or a sequence of them, got "
        f"{type(value).__name__} {value!r}"
    )
  compiled = []
  for pattern in value:
    if isinstance(pattern, re.Pattern):
      compiled.append(pattern)
      continue
    if not isinstance(pattern, str):
      raise TypeError(
          f"{owner}: {option} holds {type(pattern).__name__} {pattern!r}; "
          "each pattern must be a regex string"
      )
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(
          f"{owner}: {option} pattern {pattern!r} is not a valid regex: {e}"
      ) from None
  return compiled


def import_state(
    state: Mapping[str, Any],
    target: Any,
    rules: Sequence[Rule],
    *,
    ignore: Sequence[str] = (),
    allow_missing: Sequence[str] = (),
    rename=None,
    unrename=None,
    owner: str = "import_state",
) -> Any:
  """Maps a flat checkpoint onto ``target``'s tree, checking every name and shape.

  Args:
    state: checkpoint name -> array (e.g. from ``safetensors.numpy.load_file``).
    target: the tree to fill; its leaves give the expected shapes and dtypes (arrays or
      ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``). Paths are written as in
      :func:`~cram_jax.compress.select.path_str`.
    rules: the conversion table.
    ignore: regexes (``re.search``) of checkpoint names to skip silently; a
      single string is one regex.
    allow_missing: regexes of our paths that may be absent from the checkpoint; they
      keep their value from ``target``, which must then hold arrays there. A
      single string is one regex.
    rename: optional function applied to every checkpoint name before matching, e.g.
      to accept legacy spellings.
    unrename: the inverse of ``rename``, used to name missing keys.
    owner: name used in error messages.

  Returns:
    A tree with ``target``'s structure holding ``jnp`` arrays in the target dtypes.

  Raises:
    ValueError: listing all missing keys, unexpected keys and shape mismatches;
      or naming an invalid regex.
    TypeError: ``state`` is not a mapping of names, or a pattern is not a string.
  """
  if not isinstance(state, Mapping):
    raise TypeError(
        f"{owner}: the checkpoint must be a mapping of names to arrays (e.g. "
        f"safetensors.numpy.load_file(path)), got {type(state).__name__}"
    )
  bad = [k for k in state if not isinstance(k, str)]
  if bad:
    raise TypeError(
        f"{owner}: checkpoint names must be strings, got {bad[0]!r}"
    )
  ignore_re = _patterns(owner, "ignore", ignore)
  missing_ok = _patterns(owner, "allow_missing", allow_missing)
  want = {
      path_str(p): leaf
      for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  found: dict[str, np.ndarray] = {}
  unexpected, wrong = [], []
  misshapen = set()  # reported as wrong shapes, not again as missing
  for name, value in state.items():
    key = rename(name) if rename else name
    if any(p.search(name) for p in ignore_re):
      continue
    rule, path = _lookup(rules, key, ours=False)
    if rule is None or path not in want:
      unexpected.append(
          f"'{name}'"
          if path is None
          else f"'{name}' (-> '{path}', not in the model)"
      )
      continue
    value = np.asarray(value)
    expected = _shape(want[path])
    if (
        not rule.transform.ndim_ok(value)
        or rule.transform.to_ours(value).shape != expected
    ):
      misshapen.add(path)
      wrong.append(
          f"'{name}': checkpoint shape {value.shape}, model expects "
          f"{rule.transform.theirs_shape(expected)} (our '{path}' is {expected})"
      )
      continue
    if path in found:
      unexpected.append(f"'{name}' (a second value for '{path}')")
      continue
    found[path] = rule.transform.to_ours(value)
  matched = len(found)
  missing = []
  for path, leaf in want.items():
    if path in found or path in misshapen:
      continue
    allowed = any(p.search(path) for p in missing_ok)
    if allowed and not isinstance(leaf, jax.ShapeDtypeStruct):
      found[path] = np.asarray(leaf)
      continue
    _, theirs = _lookup(rules, path, ours=True)
    if theirs is None:
      entry = f"'{path}' (no rule maps it)"
    else:
      entry = f"'{unrename(theirs) if unrename else theirs}' (for '{path}')"
    if allowed:
      entry += " (allowed missing, but target holds only its shape: pass initialised params)"
    missing.append(entry)
  if missing or unexpected or wrong:
    lines = [f"{owner}: the checkpoint does not match the model."]
    if state and not matched and not wrong:
      lines.append(
          f"  none of the checkpoint's {len(state)} names maps onto the "
          f"model's {len(want)} leaves: is it the checkpoint of another "
          "architecture, or the target of another model?"
      )
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
      lines.append(
          f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}; "
          "pass ignore=[regex, ...] to skip them"
      )
    if wrong:
      lines.append(f"  wrong shapes ({len(wrong)}): {_fmt(wrong)}")
    raise ValueError("\n".join(lines))

  def fill(p, leaf):
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
    return jnp.asarray(found[path_str(p)], dtype=dtype)

  return jax.tree_util.tree_map_with_path(fill, target)


def export_state(
    tree: Any,
    rules: Sequence[Rule],
    *,
    unrename=None,
    owner: str = "export_state",
) -> dict[str, np.ndarray]:
  """The inverse of :func:`import_state`: a flat ``{checkpoint name: numpy array}``.

  ``unrename`` maps the table's names to the checkpoint's (see :func:`import_state`).

  Raises:
    ValueError: naming the leaves no rule maps.
  """
  out, unmapped = {}, []
  for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = path_str(p)
    rule, name = _lookup(rules, path, ours=True)
    if rule is None:
      unmapped.append(path)
      continue
    # safetensors needs C-contiguous buffers; transposes are views.
    name = unrename(name) if unrename else name
    out[name] = np.ascontiguousarray(rule.transform.to_theirs(np.asarray(leaf)))
  if unmapped:
    hint = ""
    if not out:
      hint = " (none of the tree's leaves maps: is it another model's tree?)"
    raise ValueError(
        f"{owner}: no rule maps these leaves{hint}: {_fmt(unmapped)}"
    )
  return out


# --------------------------------------------------------------------------- BERT

# Encoder rows, relative to the BERT module (HF's BertModel, our BertModel).
BERT_RULES = (
    Rule(
        "embeddings.word_embeddings.weight",
        "embeddings/word_embeddings/embedding",
    ),
    Rule(
        "embeddings.position_embeddings.weight",
        "embeddings/position_embeddings/embedding",
    ),
    Rule(
        "embeddings.token_type_embeddings.weight",
        "embeddings/token_type_embeddings/embedding",
    ),
    Rule("embeddings.LayerNorm.weight", "embeddings/norm/scale"),
    Rule("embeddings.LayerNorm.bias", "embeddings/norm/bias"),
    Rule(
        "encoder.layer.{i}.attention.self.{qkv:query|key|value}.weight",
        "encoder/layer_{i}/attention/{qkv:query|key|value}/kernel",
        LINEAR,
    ),
    Rule(
        "encoder.layer.{i}.attention.self.{qkv:query|key|value}.bias",
        "encoder/layer_{i}/attention/{qkv:query|key|value}/bias",
    ),
    Rule(
        "encoder.layer.{i}.attention.output.dense.weight",
        "encoder/layer_{i}/attention/out/kernel",
        LINEAR,
    ),
    Rule(
        "encoder.layer.{i}.attention.output.dense.bias",
        "encoder/layer_{i}/attention/out/bias",
    ),
    Rule(
        "encoder.layer.{i}.attention.output.LayerNorm.weight",
        "encoder/layer_{i}/attention_norm/scale",
    ),
    Rule(
        "encoder.layer.{i}.attention.output.LayerNorm.bias",
        "encoder/layer_{i}/attention_norm/bias",
    ),
    Rule(
        "encoder.layer.{i}.intermediate.dense.weight",
        "encoder/layer_{i}/intermediate/kernel",
        LINEAR,
    ),
    Rule(
        "encoder.layer.{i}.intermediate.dense.bias",
        "encoder/layer_{i}/intermediate/bias",
    ),
    Rule(
        "encoder.layer.{i}.output.dense.weight",
        "encoder/layer_{i}/output/kernel",
        LINEAR,
    ),
    Rule(
        "encoder.layer.{i}.output.dense.bias", "encoder/layer_{i}/output/bias"
    ),
    Rule(
        "encoder.layer.{i}.output.LayerNorm.weight",
        "encoder/layer_{i}/output_norm/scale",
    ),
    Rule(
        "encoder.layer.{i}.output.LayerNorm.bias",
        "encoder/layer_{i}/output_norm/bias",
    ),
    Rule("pooler.dense.weight", "pooler/kernel", LINEAR),
    Rule("pooler.dense.bias", "pooler/bias"),
)

# Task heads sit beside the encoder, at the top of both trees.
BERT_HEAD_RULES = (
    Rule("qa_outputs.weight", "qa_outputs/kernel", LINEAR),
    Rule("qa_outputs.bias", "qa_outputs/bias"),
    Rule("classifier.weight", "classifier/kernel", LINEAR),
    Rule("classifier.bias", "classifier/bias"),
)

BERT_IGNORED = (r"(^|\.)position_ids$",)
"""Checkpoint names skipped by default: the position-id buffer older HF versions saved."""

PRETRAINING_HEADS = BERT_IGNORED + (r"^cls\.", r"^(bert\.)?pooler\.")
"""``ignore=`` for loading a pre-training checkpoint (e.g. bert-base-uncased) into
:class:`~cram_jax.models.bert.BertForQuestionAnswering`: drops the MLM/NSP heads and the
pooler the QA model does not have. Combine with ``allow_missing=(r'^qa_outputs/',)`` and
initialised params as ``target`` to keep a freshly initialised head."""


def _bert_rules(target: Any) -> tuple[tuple[Rule, ...], bool]:
  """The table for ``target``: prefixed with ``bert.``/``bert/`` for task models."""
  if not isinstance(target, Mapping):
    raise TypeError(
        f"BERT conversion: params must be a dict tree, got {type(target).__name__}"
    )
  if set(target) == {"params"}:
    raise ValueError(
        "BERT conversion: pass variables['params'], not the variables dict"
    )
  if "bert" not in target:
    return BERT_RULES + BERT_HEAD_RULES, False
  encoder = tuple(r.prefixed("bert.", "bert/") for r in BERT_RULES)
  return encoder + BERT_HEAD_RULES, True


def _hf_bert_name(name: str, prefixed: bool) -> str:
  """Canonical HF name: LayerNorm gamma/beta -> weight/bias, ``bert.`` as the model has it."""
  name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
  name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
  bare = name.removeprefix("bert.")
  head = any(r.match_theirs(bare) for r in BERT_HEAD_RULES)
  return "bert." + bare if prefixed and not head else bare


def import_bert(
    state: Mapping[str, Any],
    target: Any,
    *,
    ignore: Sequence[str] = BERT_IGNORED,
    allow_missing: Sequence[str] = (),
) -> Any:
  """Converts a Hugging Face (PyTorch-named) BERT state dict to our params.

  Accepts names with or without the ``bert.`` prefix and the legacy LayerNorm
  ``gamma``/``beta`` names. Linear weights are transposed ``(out, in) -> (in, out)``.

  Args:
    state: checkpoint name -> array.
    target: ``variables['params']`` of a :class:`~cram_jax.models.bert.BertModel`,
      ``BertForSequenceClassification`` or ``BertForQuestionAnswering``, as arrays or as
      shapes (:func:`bert_abstract_params`).
    ignore: regexes of checkpoint names to skip (a single string is one regex);
      default skips ``position_ids`` buffers. Passing it replaces the default.
    allow_missing: regexes of our paths that may be missing (kept from ``target``).

  Returns:
    The params tree.

  Raises:
    ValueError: listing missing keys, unexpected keys and wrong shapes.
  """
  rules, prefixed = _bert_rules(target)
  return import_state(
      state,
      target,
      rules,
      ignore=ignore,
      allow_missing=allow_missing,
      rename=lambda n: _hf_bert_name(n, prefixed),
      owner="import_bert",
  )


def export_bert(params: Any) -> dict[str, np.ndarray]:
  """Our BERT params -> HF PyTorch names (``bert.`` prefix for task models)."""
  rules, _ = _bert_rules(params)
  return export_state(params, rules, owner="export_bert")


def bert_abstract_params(model: Any) -> Any:
  """``variables['params']`` of a BERT module as shapes, without allocating them."""
  if not isinstance(model, bert_lib.BERT_MODULES):
    raise TypeError(
        "bert_abstract_params: model must be a BertModel, "
        "BertForSequenceClassification or BertForQuestionAnswering, got "
        f"{type(model).__name__}"
    )
  ids = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), ids, train=False)
  )
  return variables["params"]


def _safetensors(owner: str):
  """``safetensors.numpy``, imported on first use: the models need only base deps."""
  try:
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:
    raise ImportError(
        f"cram_jax.models.{owner} needs the 'models' extra: "
        f"pip install 'cram_jax[models]' (missing module: {e.name})",
        name=e.name,
    ) from e
  return safetensors.numpy


_TORCH_HELP = (
    "convert it once, where torch is installed, with\n"
    "  import torch, safetensors.torch\n"
    "  state = torch.load({path!r}, map_location='cpu', weights_only=True)\n"
    "  safetensors.torch.save_file({{k: v.contiguous().clone() for k, v in "
    "state.items()}}, 'model.safetensors')\n"
    "or download the checkpoint's model.safetensors (most Hugging Face BERT "
    "repositories have one)"
)


def checkpoint_file(path: str | os.PathLike, owner: str = "load_bert") -> str:
  """The safetensors file to read for ``path``, checked before reading it.

  ``path`` is a ``.safetensors`` file or a directory holding ``model.safetensors``
  (what ``transformers``' ``save_pretrained`` writes).

  Raises:
    TypeError: ``path`` is not a string or path.
    FileNotFoundError: nothing at ``path``, or a directory without
      ``model.safetensors``.
    ValueError: a PyTorch pickle checkpoint (``.bin``, ``.pt``), a sharded
      checkpoint, or a file too short for a safetensors header.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(
        f"{owner}: path must be a str or os.PathLike naming a .safetensors "
        f"file, got {type(path).__name__} {path!r}"
    )
  path = os.fspath(path)
  if os.path.isdir(path):
    inside = os.path.join(path, "model.safetensors")
    if os.path.isfile(inside):
      return inside
    listing = sorted(os.listdir(path))
    if "model.safetensors.index.json" in listing:
      raise ValueError(
          f"{owner}: {path!r} holds a sharded checkpoint "
          "(model.safetensors.index.json); save it unsharded, e.g. "
          "model.save_pretrained(out, max_shard_size='10GB')"
      )
    hint = ""
    if "pytorch_model.bin" in listing:
      hint = "; it has pytorch_model.bin, a PyTorch checkpoint: " + (
          _TORCH_HELP.format(path=os.path.join(path, "pytorch_model.bin"))
      )
    raise FileNotFoundError(
        f"{owner}: {path!r} is a directory without model.safetensors "
        f"(it holds {listing[:10]}){hint}"
    )
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{owner}: no file at {path!r}; pass a .safetensors checkpoint (or a "
        "directory holding model.safetensors)"
    )
  with open(path, "rb") as f:
    head = f.read(9)
  size = os.path.getsize(path)
  # safetensors: an 8-byte little-endian header length, then a JSON header.
  # Tested first: a header length's low byte may be 0x80, a pickle's opcode.
  header_fits = size >= 9 and int.from_bytes(head[:8], "little") <= size - 8
  if header_fits and head[8:9] == b"{":
    return path
  # A torch.save file is a zip archive (PK..) or, before torch 1.6, a raw
  # pickle (protocol 2+ starts with 0x80).
  if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
    raise ValueError(
        f"{owner}: {path!r} is a PyTorch (pickle) checkpoint, not safetensors; "
        + _TORCH_HELP.format(path=path)
    )
  if not header_fits:
    raise ValueError(
        f"{owner}: {path!r} is truncated or not a safetensors file "
        f"({size} bytes; a safetensors file starts with an 8-byte header "
        "length and a JSON header that fits in the file)"
    )
  return path


def load_bert(
    path: str | os.PathLike,
    target: Any,
    *,
    ignore: Sequence[str] | str = BERT_IGNORED,
    allow_missing: Sequence[str] | str = (),
) -> Any:
  """Reads a safetensors checkpoint and runs :func:`import_bert` on it.

  Args:
    path: a ``.safetensors`` file, or a directory holding ``model.safetensors``
      (a ``save_pretrained`` directory). PyTorch ``.bin`` files are refused with
      the command that converts them.
    target: as in :func:`import_bert`.
    ignore: as in :func:`import_bert`.
    allow_missing: as in :func:`import_bert`.

  Raises:
    FileNotFoundError, ValueError, TypeError: naming ``path`` and what was
      expected (see :func:`checkpoint_file`), or the mismatches with ``target``.
  """
  reader = _safetensors("load_bert")
  file = checkpoint_file(path)
  try:
    state = reader.load_file(file)
  except Exception as e:  # safetensors' own errors do not name the file.
    raise ValueError(
        f"load_bert: {file!r} is truncated, corrupt or not a safetensors "
        f"file: {e}"
    ) from e
  return import_bert(state, target, ignore=ignore, allow_missing=allow_missing)


def save_bert(path: str | os.PathLike, params: Any) -> None:
  """Writes :func:`export_bert` of ``params`` as a ``.safetensors`` file."""
  writer = _safetensors("save_bert")
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(
        f"save_bert: path must be a str or os.PathLike, got "
        f"{type(path).__name__} {path!r}"
    )
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path) or not os.path.isdir(parent):
    raise FileNotFoundError(
        f"save_bert: cannot write {path!r}: "
        + (
            "it is a directory"
            if os.path.isdir(path)
            else f"no directory {parent!r}"
        )
        + "; pass a file path such as 'out/model.safetensors'"
    )
  writer.save_file(export_bert(params), path)


# --------------------------------------------------------------------- torchvision

# torchvision ResNet names against our *variables* (params and batch_stats).
_BN = (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
)
TORCHVISION_RESNET_RULES = (
    Rule("conv1.weight", "params/conv_init/kernel", CONV),
    *(Rule(f"bn1.{t}", f"{c}/bn_init/{o}") for t, c, o in _BN),
    Rule(
        "layer{s}.{b}.conv{k}.weight",
        "params/stage{s}_block{b}/conv{k}/kernel",
        CONV,
    ),
    *(
        Rule(
            f"layer{{s}}.{{b}}.bn{{k}}.{t}",
            f"{c}/stage{{s}}_block{{b}}/bn{{k}}/{o}",
        )
        for t, c, o in _BN
    ),
    Rule(
        "layer{s}.{b}.downsample.0.weight",
        "params/stage{s}_block{b}/shortcut_conv/kernel",
        CONV,
    ),
    *(
        Rule(
            f"layer{{s}}.{{b}}.downsample.1.{t}",
            f"{c}/stage{{s}}_block{{b}}/shortcut_bn/{o}",
        )
        for t, c, o in _BN
    ),
    Rule("fc.weight", "params/head/kernel", LINEAR),
    Rule("fc.bias", "params/head/bias"),
)
"""torchvision ``resnet{18,...,152}`` state dict <-> our ImageNet :class:`ResNet` variables.

The table's block numbers are ours (from 1); torchvision counts from 0, and
:func:`import_torchvision_resnet` / :func:`export_torchvision_resnet` shift them.
"""


def _shift_block(name: str, by: int) -> str:
  return re.sub(
      r"^(layer\d+\.)(\d+)\.", lambda m: f"{m[1]}{int(m[2]) + by}.", name
  )


def _check_resnet_variables(owner: str, variables: Any) -> None:
  """Torchvision's state dict holds BatchNorm statistics: we need both collections."""
  if not isinstance(variables, Mapping):
    raise TypeError(
        f"{owner}: pass the ResNet's variables {{'params': ..., "
        f"'batch_stats': ...}}, got {type(variables).__name__}"
    )
  if set(variables) != {"params", "batch_stats"}:
    raise ValueError(
        f"{owner}: pass the ResNet's whole variables {{'params': ..., "
        f"'batch_stats': ...}} (e.g. model.init(...) or jax.eval_shape of it), "
        f"got a tree with top-level keys {sorted(map(str, variables))}"
    )


def import_torchvision_resnet(state: Mapping[str, Any], target: Any) -> Any:
  """A torchvision ResNet state dict -> our variables ``{'params', 'batch_stats'}``.

  ``target`` is the whole variables dict (arrays or ``jax.eval_shape`` shapes).
  ``num_batches_tracked`` counters are skipped.
  """
  _check_resnet_variables("import_torchvision_resnet", target)
  return import_state(
      state,
      target,
      TORCHVISION_RESNET_RULES,
      ignore=(r"num_batches_tracked$",),
      rename=lambda n: _shift_block(n, 1),
      unrename=lambda n: _shift_block(n, -1),
      owner="import_torchvision_resnet",
  )


def export_torchvision_resnet(variables: Any) -> dict[str, np.ndarray]:
  """Our ImageNet ResNet variables -> torchvision names (without ``num_batches_tracked``)."""
  _check_resnet_variables("export_torchvision_resnet", variables)
  return export_state(
      variables,
      TORCHVISION_RESNET_RULES,
      unrename=lambda n: _shift_block(n, -1),
      owner="export_torchvision_resnet",
  )
