"""BERT inputs for GLUE and SQuAD v1.1: WordPiece tokenisation and windows.

Tokenisation is BERT's: `BertNormalizer` (clean text, optional lower-casing,
accents stripped when lower-casing), `BertPreTokenizer`, greedy WordPiece
over a `vocab.txt` (one token per line, as shipped with BERT checkpoints),
built with the `tokenizers` library.

GLUE (`glue/<task>`): one example -> `input_ids`, `token_type_ids`,
`attention_mask` (int32, padded to `max_seq_length`, pairs truncated
longest-first) and `label` (int32; float32 for `stsb`; -1 on test splits).

SQuAD v1.1 (`squad/v1.1`): each example becomes one or more windows
("features") `[CLS] question [SEP] context-span [SEP]`, as in BERT's
`run_squad.py`: the question is cut to `max_query_length` tokens, the context
is covered by spans of at most `max_seq_length - len(question) - 3` tokens
whose starts are `doc_stride` tokens apart. (`doc_stride` is the step between
window starts, as in BERT; the `stride` of Hugging Face tokenizers is the
overlap instead.) `start_positions`/`end_positions` index the first answer's
tokens in the window, or 0 ([CLS]) when the window does not contain the whole
answer. Evaluation batches also carry `offsets` (character span of each
context token in the context, -1 elsewhere), `token_is_max_context` and
`example_index`, which `postprocess_squad` uses to map logits back to text.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from cram_jax.data import sampling, sources

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]')

# Text fields of each GLUE task in TFDS (second is None for single sentences).
GLUE_TEXT_FIELDS = {
    'cola': ('sentence', None),
    'sst2': ('sentence', None),
    'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'),
    'stsb': ('sentence1', 'sentence2'),
    'mnli': ('premise', 'hypothesis'),
    'qnli': ('question', 'sentence'),
    'rte': ('sentence1', 'sentence2'),
    'wnli': ('sentence1', 'sentence2'),
    'ax': ('premise', 'hypothesis'),
}


def as_text(value: Any) -> str:
  """Returns a TFDS text value (`bytes`, numpy scalar or `str`) as `str`."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  return str(value)


def wordpiece_tokenizer(
    vocab_file: str | os.PathLike, *, lowercase: bool = True
) -> tokenizers.Tokenizer:
  """Returns BERT's WordPiece tokenizer for `vocab_file`.

  Args:
    vocab_file: BERT `vocab.txt`; must contain [PAD], [UNK], [CLS], [SEP].
    lowercase: lower-case and strip accents (uncased checkpoints).

  Returns:
    A `tokenizers.Tokenizer` that adds `[CLS] A [SEP] (B [SEP])` and type
    ids 0/1 when `add_special_tokens=True`.
  """
  owner = 'wordpiece_tokenizer'
  if not isinstance(vocab_file, (str, os.PathLike)):
    raise TypeError(
        f'{owner}: vocab_file={vocab_file!r} must be a path to the BERT'
        " checkpoint's vocab.txt"
    )
  sampling.check_bool(owner, 'lowercase', lowercase)
  vocab_file = os.fspath(vocab_file)
  if os.path.isdir(vocab_file):
    raise FileNotFoundError(
        f'{owner}: vocab_file={vocab_file!r} is a directory; pass the'
        ' vocab.txt file inside it'
        + (
            ' (it has one)'
            if os.path.isfile(os.path.join(vocab_file, 'vocab.txt'))
            else ''
        )
    )
  if not os.path.isfile(vocab_file):
    raise FileNotFoundError(
        f'{owner}: vocab_file={vocab_file!r} does not exist;'
        ' pass the vocab.txt of the BERT checkpoint (one token per line)'
    )
  try:
    vocab = models.WordPiece.read_file(vocab_file)
  except Exception as e:  # tokenizers raises a bare Exception.
    raise ValueError(
        f'{owner}: vocab_file={vocab_file!r} is not a WordPiece vocabulary'
        f' (UTF-8 text, one token per line): {e}'
    ) from None
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(
        f'wordpiece_tokenizer: vocab_file={vocab_file!r} lacks the special'
        f' tokens {missing}'
    )
  tokenizer = tokenizers.Tokenizer(
      models.WordPiece(vocab, unk_token='[UNK]', max_input_chars_per_word=100)
  )
  # strip_accents=None follows `lowercase`, as in the original BERT.
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True,
      handle_chinese_chars=True,
      strip_accents=None,
      lowercase=lowercase,
  )
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls_id, sep_id = vocab['[CLS]'], vocab['[SEP]']
  tokenizer.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]',
      pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)],
  )
  tokenizer.decoder = decoders.WordPiece()
  return tokenizer


# ----------------------------------------------------------------------------
# GLUE.


def glue_task(name: str) -> str:
  """Returns the task of a TFDS GLUE name (`'glue/sst2'` -> `'sst2'`)."""
  parts = name.split(':')[0].split('/')
  if len(parts) != 2 or parts[0] != 'glue' or parts[1] not in GLUE_TEXT_FIELDS:
    raise ValueError(
        f'glue_task: name={name!r} is not one of'
        f' {["glue/" + t for t in GLUE_TEXT_FIELDS]}'
    )
  return parts[1]


class GlueTransform:
  """Tokenises one GLUE example into fixed-length BERT inputs.

  Args:
    task: GLUE task, e.g. `'sst2'`.
    vocab_file: BERT `vocab.txt`.
    max_seq_length: output length; longer inputs are truncated
      longest-first, shorter ones padded with [PAD].
    lowercase: uncased tokenisation.
  """

  def __init__(
      self,
      task: str,
      vocab_file: str | os.PathLike,
      *,
      max_seq_length: int = 128,
      lowercase: bool = True,
  ):
    if task not in GLUE_TEXT_FIELDS:
      raise ValueError(f'GlueTransform: unknown task={task!r}')
    sampling.check_int('GlueTransform', 'max_seq_length', max_seq_length)
    if max_seq_length < 4:
      raise ValueError(
          f'GlueTransform: max_seq_length={max_seq_length} must be >= 4'
      )
    self.fields = GLUE_TEXT_FIELDS[task]
    self.regression = task == 'stsb'
    self.tokenizer = wordpiece_tokenizer(vocab_file, lowercase=lowercase)
    self.tokenizer.enable_truncation(
        max_length=max_seq_length, strategy='longest_first'
    )
    self.tokenizer.enable_padding(
        length=max_seq_length,
        pad_id=self.tokenizer.token_to_id('[PAD]'),
        pad_token='[PAD]',
    )

  def __call__(
      self, example: Mapping[str, Any], rng: np.random.Generator | None = None
  ) -> dict[str, np.ndarray]:
    del rng  # No text augmentation.
    first, second = self.fields
    if second is None:
      encoding = self.tokenizer.encode(as_text(example[first]))
    else:
      encoding = self.tokenizer.encode(
          as_text(example[first]), as_text(example[second])
      )
    label_dtype = np.float32 if self.regression else np.int32
    return {
        'input_ids': np.asarray(encoding.ids, np.int32),
        'token_type_ids': np.asarray(encoding.type_ids, np.int32),
        'attention_mask': np.asarray(encoding.attention_mask, np.int32),
        'label': np.asarray(example['label'], label_dtype),
    }


# ----------------------------------------------------------------------------
# SQuAD.


@dataclasses.dataclass(frozen=True)
class SquadOptions:
  """Window options (defaults of BERT's run_squad.py).

  Attributes:
    max_seq_length: tokens per window, special tokens included.
    doc_stride: tokens between the starts of consecutive context spans.
    max_query_length: question tokens kept.
  """

  max_seq_length: int = 384
  doc_stride: int = 128
  max_query_length: int = 64

  def __post_init__(self):
    for name in ('max_seq_length', 'doc_stride', 'max_query_length'):
      sampling.check_int('SquadOptions', name, getattr(self, name))
    if self.max_query_length < 1 or self.doc_stride < 1:
      raise ValueError(
          f'SquadOptions: max_query_length={self.max_query_length} and'
          f' doc_stride={self.doc_stride} must be >= 1'
      )
    if self.max_seq_length < self.max_query_length + 4:
      raise ValueError(
          f'SquadOptions: max_seq_length={self.max_seq_length} leaves no'
          ' room for the'
          f' context after max_query_length={self.max_query_length} and 3'
          ' special tokens'
      )


def answer_token_span(
    offsets: np.ndarray, char_start: int, char_end: int
) -> tuple[int, int]:
  """Returns the first and last token overlapping `[char_start, char_end)`.

  Args:
    offsets: `(n, 2)` character spans of the context tokens.
    char_start: first character of the answer.
    char_end: one past its last character.

  Returns:
    `(start_token, end_token)`, or `(-1, -1)` if no token overlaps.
  """
  if len(offsets) == 0 or char_end <= char_start:
    return -1, -1
  overlaps = (offsets[:, 1] > char_start) & (offsets[:, 0] < char_end)
  hits = np.flatnonzero(overlaps)
  if hits.size == 0:
    return -1, -1
  return int(hits[0]), int(hits[-1])


class SquadWindows(Sequence):
  """The windows (features) of a SQuAD split, assembled on access.

  Construction tokenises every question and every distinct context once (in
  parallel, in Rust) and lays out the windows; `windows[i]` then builds the
  padded arrays of window `i`, so memory stays proportional to the text, not
  to `num_windows * max_seq_length`.

  Args:
    examples: random-access TFDS `squad` examples (`id`, `question`,
      `context`, `answers: {text, answer_start}`).
    vocab_file: BERT `vocab.txt`.
    options: `SquadOptions`.
    lowercase: uncased tokenisation.
    with_offsets: also return `offsets` and `token_is_max_context`
      (evaluation).
  """

  def __init__(
      self,
      examples: Sequence[Mapping[str, Any]],
      vocab_file: str | os.PathLike,
      *,
      options: SquadOptions = SquadOptions(),
      lowercase: bool = True,
      with_offsets: bool = False,
  ):
    self.options = options
    self.with_offsets = with_offsets
    tokenizer = wordpiece_tokenizer(vocab_file, lowercase=lowercase)
    self.cls_id = tokenizer.token_to_id('[CLS]')
    self.sep_id = tokenizer.token_to_id('[SEP]')
    self.pad_id = tokenizer.token_to_id('[PAD]')

    questions, context_ids, answer_chars = [], [], []
    contexts: dict[str, int] = {}
    for i in range(len(examples)):
      example = examples[i]
      questions.append(as_text(example['question']))
      context = as_text(example['context'])
      context_ids.append(contexts.setdefault(context, len(contexts)))
      answers = example.get('answers', {})
      texts = list(answers.get('text', []))
      starts = np.asarray(answers.get('answer_start', []))
      if texts and starts.size:
        start = int(starts.reshape(-1)[0])
        answer_chars.append((start, start + len(as_text(texts[0]))))
      else:
        answer_chars.append((-1, -1))

    encoded_q = tokenizer.encode_batch(questions, add_special_tokens=False)
    encoded_c = tokenizer.encode_batch(list(contexts), add_special_tokens=False)
    self.question_ids = [
        np.asarray(e.ids[: options.max_query_length], np.int32)
        for e in encoded_q
    ]
    self.context_tokens = [np.asarray(e.ids, np.int32) for e in encoded_c]
    self.context_offsets = [
        np.asarray(e.offsets, np.int32).reshape(-1, 2) for e in encoded_c
    ]
    self.example_context = np.asarray(context_ids, np.int32)

    win_example, win_start, win_len, first_window = [], [], [], []
    answer_tokens = []
    for ex, question in enumerate(self.question_ids):
      offsets = self.context_offsets[self.example_context[ex]]
      answer_tokens.append(answer_token_span(offsets, *answer_chars[ex]))
      first_window.append(len(win_example))
      for start, length in self.spans(len(offsets), len(question)):
        win_example.append(ex)
        win_start.append(start)
        win_len.append(length)
    first_window.append(len(win_example))
    self.window_example = np.asarray(win_example, np.int32)
    self.window_start = np.asarray(win_start, np.int32)
    self.window_length = np.asarray(win_len, np.int32)
    self.first_window = np.asarray(first_window, np.int64)
    self.answer_tokens = np.asarray(answer_tokens, np.int32).reshape(-1, 2)

  def spans(self, num_tokens: int, query_length: int) -> list[tuple[int, int]]:
    """Returns `(start, length)` of the context spans, as BERT's run_squad."""
    max_doc = self.options.max_seq_length - query_length - 3
    spans, start = [], 0
    while True:
      length = min(num_tokens - start, max_doc)
      spans.append((start, length))
      if start + length >= num_tokens:
        return spans
      start += min(length, self.options.doc_stride)

  def __len__(self) -> int:
    return len(self.window_example)

  def max_context(self, window: int) -> np.ndarray:
    """Whether each span token has its most central position in `window`.

    A token in several windows is scored `min(left, right) + 0.01 *
    span_length` per window; the first window with the best score wins
    (BERT's `_check_is_max_context`).
    """
    ex = self.window_example[window]
    lo, hi = self.first_window[ex], self.first_window[ex + 1]
    start, length = self.window_start[window], self.window_length[window]
    tokens = np.arange(start, start + length)
    best = np.full(length, -np.inf)
    best_window = np.full(length, -1)
    for w in range(lo, hi):
      s, n = self.window_start[w], self.window_length[w]
      inside = (tokens >= s) & (tokens < s + n)
      score = np.minimum(tokens - s, s + n - 1 - tokens) + 0.01 * n
      better = inside & (score > best)
      best = np.where(better, score, best)
      best_window = np.where(better, w, best_window)
    return best_window == window

  def __getitem__(self, window: int) -> dict[str, np.ndarray]:
    seq_len = self.options.max_seq_length
    ex = int(self.window_example[window])
    question = self.question_ids[ex]
    context = self.context_tokens[self.example_context[ex]]
    start, length = int(self.window_start[window]), int(
        self.window_length[window]
    )
    offset = len(question) + 2  # window position of the first span token
    used = offset + length + 1

    input_ids = np.full(seq_len, self.pad_id, np.int32)
    input_ids[0] = self.cls_id
    input_ids[1 : offset - 1] = question
    input_ids[offset - 1] = self.sep_id
    input_ids[offset : offset + length] = context[start : start + length]
    input_ids[used - 1] = self.sep_id
    token_type_ids = np.zeros(seq_len, np.int32)
    token_type_ids[offset:used] = 1
    attention_mask = np.zeros(seq_len, np.int32)
    attention_mask[:used] = 1

    answer_start, answer_end = self.answer_tokens[ex]
    if (
        answer_start >= 0
        and start <= answer_start
        and answer_end < start + length
    ):
      start_position = answer_start - start + offset
      end_position = answer_end - start + offset
    else:
      start_position = end_position = 0  # [CLS]: answer not in window.
    out = {
        'input_ids': input_ids,
        'token_type_ids': token_type_ids,
        'attention_mask': attention_mask,
        'start_positions': np.int32(start_position),
        'end_positions': np.int32(end_position),
        'example_index': np.int32(ex),
    }
    if self.with_offsets:
      offsets = np.full((seq_len, 2), -1, np.int32)
      offsets[offset : offset + length] = self.context_offsets[
          self.example_context[ex]
      ][start : start + length]
      is_max = np.zeros(seq_len, bool)
      is_max[offset : offset + length] = self.max_context(window)
      out['offsets'] = offsets
      out['token_is_max_context'] = is_max
    return out

  def padding(self) -> dict[str, np.ndarray]:
    """An all-[PAD] window with `example_index` -1 (evaluation padding)."""
    out = sampling.zeros_like_example(self[0])
    out['input_ids'][:] = self.pad_id
    out['example_index'] = np.int32(-1)
    if self.with_offsets:
      out['offsets'][:] = -1
    return out


def _unchanged(example, rng=None):
  del rng
  return dict(example)


def postprocess_squad(
    examples: Sequence[Mapping[str, Any]],
    example_index: np.ndarray,
    offsets: np.ndarray,
    token_is_max_context: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
  """Maps window logits back to answer strings, one per example.

  For every window, the `n_best_size` highest start and end logits are
  paired; a pair is valid if both tokens lie in the context, `end >= start`,
  the span has at most `max_answer_length` tokens and the start token has
  its maximal context in this window. The best-scoring (start + end logit)
  valid span over all windows of an example is its answer, cut from the
  original context with the token character offsets.

  Args:
    examples: the split's examples (`id`, `context`), as read by
      `open_source('squad/v1.1', split)`.
    example_index: `(F,)` example of each window; rows < 0 (padding) are
      skipped.
    offsets: `(F, L, 2)` character spans, -1 outside the context.
    token_is_max_context: `(F, L)` bool.
    start_logits: `(F, L)`.
    end_logits: `(F, L)`.
    n_best_size: candidates per end of the span.
    max_answer_length: longest answer in tokens.

  Returns:
    `{example id: predicted text}`; examples without windows are absent,
    examples without a valid span get `''`.
  """
  owner = 'postprocess_squad'
  sampling.check_int(owner, 'n_best_size', n_best_size, minimum=1)
  sampling.check_int(owner, 'max_answer_length', max_answer_length, minimum=1)
  example_index = np.asarray(example_index)
  offsets = np.asarray(offsets)
  token_is_max_context = np.asarray(token_is_max_context)
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  if example_index.ndim != 1 or not np.issubdtype(
      example_index.dtype, np.integer
  ):
    raise ValueError(
        f'{owner}: example_index must be a 1-D integer array (one entry per'
        f' window), got shape {example_index.shape} dtype {example_index.dtype}'
    )
  windows = example_index.shape[0]
  if start_logits.ndim != 2 or start_logits.shape[0] != windows:
    raise ValueError(
        f'{owner}: start_logits has shape {start_logits.shape}; expected'
        f' ({windows}, length) for the {windows} windows of example_index'
    )
  expected = {
      'end_logits': (end_logits.shape, start_logits.shape),
      'token_is_max_context': (
          token_is_max_context.shape,
          start_logits.shape,
      ),
      'offsets': (offsets.shape, start_logits.shape + (2,)),
  }
  for name, (got, want) in expected.items():
    if got != want:
      raise ValueError(
          f'{owner}: {name} has shape {got}, expected {want} (as start_logits'
          f' {start_logits.shape})'
      )
  if windows and example_index.max() >= len(examples):
    raise ValueError(
        f'{owner}: example_index refers to example {example_index.max()}, but'
        f' examples has {len(examples)}: pass the examples of the split the'
        ' windows were made from'
    )
  best: dict[int, tuple[float, int, int, int]] = {}
  for row in np.flatnonzero(example_index >= 0):
    ex = int(example_index[row])
    best.setdefault(ex, (-np.inf, -1, -1, -1))
    in_context = offsets[row, :, 0] >= 0
    starts = np.argsort(-start_logits[row], kind='stable')[:n_best_size]
    ends = np.argsort(-end_logits[row], kind='stable')[:n_best_size]
    for s in starts:
      if not (in_context[s] and token_is_max_context[row, s]):
        continue
      for e in ends:
        if not in_context[e] or e < s or e - s + 1 > max_answer_length:
          continue
        score = float(start_logits[row, s] + end_logits[row, e])
        if score > best[ex][0]:
          best[ex] = (score, int(row), int(s), int(e))
  predictions = {}
  for ex, (_, row, s, e) in best.items():
    example = examples[ex]
    text = ''
    if row >= 0:
      context = as_text(example['context'])
      text = context[offsets[row, s, 0] : offsets[row, e, 1]]
    predictions[as_text(example['id'])] = text
  return predictions


def squad_references(
    examples: Sequence[Mapping[str, Any]],
) -> dict[str, list[str]]:
  """Returns `{example id: [gold answer texts]}` for `squad_metric.evaluate`."""
  references = {}
  for i in range(len(examples)):
    example = examples[i]
    texts = example['answers']['text']
    references[as_text(example['id'])] = [as_text(t) for t in texts]
  return references


# ----------------------------------------------------------------------------
# Pipelines.


def make_text_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    vocab_file: str | os.PathLike | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    lowercase: bool = True,
    max_seq_length: int | None = None,
    doc_stride: int = 128,
    max_query_length: int = 64,
    source: Sequence[Mapping[str, Any]] | None = None,
) -> grain.MapDataset:
  """Batched `grain.MapDataset` for GLUE or SQuAD (see `make_pipeline`).

  Args:
    name: `'glue/<task>'` or `'squad/v1.1'`.
    split: TFDS split, e.g. `'train'`, `'validation'`,
      `'validation_matched'` (mnli).
    batch_size: per-process batch size.
    train: shuffle per epoch, drop incomplete batches; else one ordered
      pass padded to whole batches (SQuAD: with offsets for decoding).
    vocab_file: BERT `vocab.txt` (required).
    seed: shuffle seed.
    data_dir: TFDS data directory.
    shard_index: this process's shard (of the windows, for SQuAD).
    shard_count: number of processes.
    num_epochs: None = forever (train) / once (eval).
    lowercase: uncased tokenisation (True for `bert-base-uncased`).
    max_seq_length: tokens per example; default 128 (GLUE), 384 (SQuAD).
    doc_stride: SQuAD: tokens between window starts.
    max_query_length: SQuAD: question tokens kept.
    source: read this sequence of examples instead of opening TFDS.

  Returns:
    A `grain.MapDataset` of batches of int32 BERT inputs, labels or answer
    positions, `index` and `mask`.
  """
  if vocab_file is None:
    raise ValueError(
        f'make_pipeline({name!r}): vocab_file is required for text tasks;'
        ' pass the vocab.txt of the BERT checkpoint'
    )
  owner = 'make_text_dataset'
  sampling.check_bool(owner, 'lowercase', lowercase)
  if max_seq_length is not None:
    sampling.check_int(owner, 'max_seq_length', max_seq_length)
  sampling.check_int(owner, 'doc_stride', doc_stride)
  sampling.check_int(owner, 'max_query_length', max_query_length)
  base = name.split('/')[0]
  if base not in ('glue', 'squad'):
    raise ValueError(
        f"make_text_dataset: name={name!r} is neither 'glue/<task>' nor"
        " 'squad/v1.1'"
    )
  if base == 'glue':
    transform = GlueTransform(
        glue_task(name),
        vocab_file,
        max_seq_length=128 if max_seq_length is None else max_seq_length,
        lowercase=lowercase,
    )
    padding = None
  else:
    # Checked (and the vocabulary read) before the examples are opened.
    options = SquadOptions(
        max_seq_length=384 if max_seq_length is None else max_seq_length,
        doc_stride=doc_stride,
        max_query_length=max_query_length,
    )
    wordpiece_tokenizer(vocab_file, lowercase=lowercase)
  if source is None:
    source = sources.open_source(name, split, data_dir=data_dir)
  if base == 'squad':
    source = SquadWindows(
        source,
        vocab_file,
        options=options,
        lowercase=lowercase,
        with_offsets=not train,
    )
    transform, padding = _unchanged, source.padding
  return sampling.batched_dataset(
      source,
      transform,
      batch_size=batch_size,
      train=train,
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      padding=padding,
  )
