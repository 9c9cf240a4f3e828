"""GLUE and SQuAD input pipelines: tokenisation, windows, decoding, and the
pipeline contract (determinism, resumption, sharding) on `mock_data`.

A small vocab is written by the test. SQuAD windows are checked on hand-made
examples served through `tfds.testing.mock_data(as_data_source_fn=...)`, so
they go through the same `tfds.data_source` path as real data.
"""

import contextlib
import string

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cram_jax import data
from cram_jax.data import squad_metric, text

MOCK = tfds.testing.MockPolicy.USE_CODE
WORDS = (
    'the cat sat on mat dog ran in park who where did what is capital of'
    ' paris france city river flows through green old small big and'
).split()
VOCAB = (
    ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    + WORDS
    + list(string.ascii_lowercase)
    + ['##' + c for c in string.ascii_lowercase]
    + list('.,?!\'"')
)
PAD, UNK, CLS, SEP = 0, 1, 2, 3


@pytest.fixture(scope='module')
def vocab_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
  path.write_text('\n'.join(VOCAB) + '\n')
  return str(path)


@contextlib.contextmanager
def mock(num_examples=8, examples=None):
  kwargs = {}
  if examples is not None:
    kwargs['as_data_source_fn'] = lambda self, split, **unused: examples
  with tfds.testing.mock_data(num_examples=num_examples, policy=MOCK, **kwargs):
    yield


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------
# Tokeniser.


@pytest.mark.parametrize('lowercase', [True, False])
def test_tokenizer_matches_transformers_bert_tokenizer(vocab_file, lowercase):
  import transformers  # pylint: disable=import-outside-toplevel  # test-only pin

  oracle = transformers.BertTokenizer(vocab_file, do_lower_case=lowercase)
  ours = data.wordpiece_tokenizer(vocab_file, lowercase=lowercase)
  pairs = [
      ('The cat sat on the mat.', None),
      ('Who ran in the park?', 'The old dog, "Rex", ran!'),
      ('Paris is the capital of France', 'Café naïve xyzzy'),
      ('  multiple   spaces\tand\ntabs ', 'UPPER lower MiXeD'),
  ]
  for a, b in pairs:
    want = oracle(a, b)
    got = ours.encode(a, b) if b is not None else ours.encode(a)
    assert got.ids == want['input_ids'], (a, b)
    assert got.type_ids == want['token_type_ids'], (a, b)


def test_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    data.wordpiece_tokenizer(tmp_path / 'nope.txt')
  bad = tmp_path / 'bad.txt'
  bad.write_text('a\nb\n')
  with pytest.raises(ValueError, match=r'\[PAD\]'):
    data.wordpiece_tokenizer(bad)


# ----------------------------------------------------------------------------
# GLUE on mock data.


def test_sst2_batches(vocab_file):
  with mock(10):
    source = data.open_source('glue/sst2', 'validation')
    it = data.make_pipeline(
        'glue/sst2',
        'validation',
        batch_size=4,
        train=False,
        vocab_file=vocab_file,
    )
    batches = take(it, 3)
  tokenizer = data.wordpiece_tokenizer(vocab_file)
  for batch in batches:
    for key in ('input_ids', 'token_type_ids', 'attention_mask'):
      assert batch[key].shape == (4, 128) and batch[key].dtype == np.int32
    assert batch['label'].dtype == np.int32
    for row in np.flatnonzero(batch['mask']):
      ids = batch['input_ids'][row]
      length = int(batch['attention_mask'][row].sum())
      want = tokenizer.encode(
          text.as_text(source[int(batch['index'][row])]['sentence'])
      ).ids
      assert ids[:length].tolist() == want
      assert (ids[length:] == PAD).all()
      assert (batch['attention_mask'][row, :length] == 1).all()
      assert not batch['token_type_ids'][row].any()
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'], [True, True, False, False])
  np.testing.assert_array_equal(last['index'], [8, 9, -1, -1])


def test_mnli_pairs_truncate_longest_first(vocab_file):
  with mock(6):
    batch = next(
        data.make_pipeline(
            'glue/mnli',
            'validation_matched',
            batch_size=3,
            train=False,
            vocab_file=vocab_file,
            max_seq_length=16,
        )
    )
  ids, types = batch['input_ids'], batch['token_type_ids']
  assert ids.shape == (3, 16)
  # Mock sentences are 10-20 letters: every pair is cut to exactly 16.
  assert (batch['attention_mask'] == 1).all()
  for row in range(3):
    seps = np.flatnonzero(ids[row] == SEP)
    assert ids[row, 0] == CLS and len(seps) == 2 and seps[1] == 15
    assert (types[row, : seps[0] + 1] == 0).all() and (
        types[row, seps[0] + 1 :] == 1
    ).all()
  assert set(batch['label'].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize('task', ['qnli', 'qqp', 'stsb'])
def test_other_glue_tasks(vocab_file, task):
  with mock(4):
    batch = next(
        data.make_pipeline(
            f'glue/{task}',
            'train',
            batch_size=2,
            train=True,
            vocab_file=vocab_file,
        )
    )
  assert batch['input_ids'].shape == (2, 128)
  assert batch['label'].dtype == (np.float32 if task == 'stsb' else np.int32)
  assert (batch['token_type_ids'] == 1).any()


def test_glue_determinism_resume_and_sharding(vocab_file):
  kwargs = dict(batch_size=2, train=True, vocab_file=vocab_file, seed=4)
  with mock(8):
    it = data.make_pipeline('glue/sst2', 'train', **kwargs)
    take(it, 3)
    state = it.get_state()
    later = take(it, 3)
    fresh = data.make_pipeline('glue/sst2', 'train', **kwargs)
    fresh.set_state(state)
    for a, b in zip(take(fresh, 3), later):
      np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
    seen = []
    for s in range(2):
      it = data.make_pipeline(
          'glue/sst2', 'train', shard_index=s, shard_count=2, **kwargs
      )
      seen.append(np.concatenate([b['index'] for b in take(it, 2)]))
  assert sorted(np.concatenate(seen)) == list(range(8))


def test_text_needs_a_vocab():
  with pytest.raises(ValueError, match='vocab_file is required'):
    data.make_pipeline('glue/sst2', 'train', batch_size=2, train=True)
  with pytest.raises(ValueError, match="name='glue/foo'"):
    data.make_pipeline(
        'glue/foo', 'train', batch_size=2, train=True, vocab_file='v'
    )


# ----------------------------------------------------------------------------
# SQuAD.

CONTEXT = (
    'The old city of Paris is the capital of France. A green river flows'
    ' through the city and the park. The small dog ran in the park and the'
    ' big cat sat on the mat.'
)


def squad_example(qid, question, answer):
  start = CONTEXT.index(answer)
  return {
      'id': qid.encode(),
      'title': b'Paris',
      'context': CONTEXT.encode(),
      'question': question.encode(),
      'answers': {
          'text': np.array([answer.encode(), b'extra gold'], dtype=object),
          'answer_start': np.array([start, 0], np.int32),
      },
  }


EXAMPLES = [
    squad_example('q0', 'What is the capital of France?', 'Paris'),
    squad_example('q1', 'Where did the small dog run?', 'in the park'),
    squad_example('q2', 'Who sat on the mat?', 'the big cat'),
    squad_example('q3', 'What flows through the city?', 'A green river'),
]
SMALL = dict(max_seq_length=24, doc_stride=5, max_query_length=8)


def expected_spans(num_tokens, query_length, max_seq_length, doc_stride):
  """BERT run_squad.py's window starts, written out directly."""
  max_doc = max_seq_length - query_length - 3
  spans, start = [], 0
  while start < num_tokens:
    length = min(max_doc, num_tokens - start)
    spans.append((start, length))
    if start + length == num_tokens:
      break
    start += min(length, doc_stride)
  return spans


def test_squad_windows_layout_and_positions(vocab_file):
  options = text.SquadOptions(**SMALL)
  windows = text.SquadWindows(
      EXAMPLES, vocab_file, options=options, with_offsets=True
  )
  tokenizer = data.wordpiece_tokenizer(vocab_file)
  context = tokenizer.encode(CONTEXT, add_special_tokens=False)
  seen_inside = seen_outside = 0
  for ex, example in enumerate(EXAMPLES):
    question = tokenizer.encode(
        example['question'].decode(), add_special_tokens=False
    ).ids[:8]
    spans = expected_spans(len(context.ids), len(question), 24, 5)
    rows = [w for w in range(len(windows)) if windows.window_example[w] == ex]
    assert len(rows) == len(spans)
    max_context_count = np.zeros(len(context.ids), int)
    answer = example['answers']['text'][0].decode()
    for w, (start, length) in zip(rows, spans):
      f = windows[w]
      body = (
          [CLS] + question + [SEP] + context.ids[start : start + length] + [SEP]
      )
      assert f['input_ids'][: len(body)].tolist() == body
      assert (f['input_ids'][len(body) :] == PAD).all()
      assert f['attention_mask'].sum() == len(body)
      q = len(question) + 2
      assert (f['token_type_ids'][q : len(body)] == 1).all()
      assert f['token_type_ids'].sum() == length + 1
      first = np.flatnonzero(f['token_is_max_context'])
      max_context_count[start + first - q] += 1
      s, e = int(f['start_positions']), int(f['end_positions'])
      if s:
        seen_inside += 1
        assert CONTEXT[f['offsets'][s, 0] : f['offsets'][e, 1]] == answer
      else:
        seen_outside += 1
        assert e == 0
        a0 = CONTEXT.index(answer)
        in_window = [
            o
            for o in context.offsets[start : start + length]
            if o[0] < a0 + len(answer) and o[1] > a0
        ]
        assert len(in_window) < len(
            tokenizer.encode(answer, add_special_tokens=False).ids
        )
    # Every context token is "max context" in exactly one window.
    assert (max_context_count == 1).all()
  assert seen_inside and seen_outside


def squad_eval_arrays(batches):
  keys = ('example_index', 'offsets', 'token_is_max_context', 'input_ids')
  return {k: np.concatenate([b[k] for b in batches]) for k in keys}


def oracle_logits(arrays, examples):
  """Logits peaked at the gold answer in each window that contains it."""
  rng = np.random.default_rng(0)
  n, length = arrays['input_ids'].shape
  start = rng.normal(size=(n, length)).astype(np.float32)
  end = rng.normal(size=(n, length)).astype(np.float32)
  for row in range(n):
    ex = arrays['example_index'][row]
    if ex < 0:
      continue
    answer = examples[ex]['answers']['text'][0].decode()
    a0 = CONTEXT.index(answer)
    offsets = arrays['offsets'][row]
    overlap = (
        (offsets[:, 0] >= 0)
        & (offsets[:, 1] > a0)
        & (offsets[:, 0] < a0 + len(answer))
    )
    hits = np.flatnonzero(overlap)
    if (
        len(hits)
        and offsets[hits[0], 0] == a0
        and offsets[hits[-1], 1] == a0 + len(answer)
    ):
      start[row, hits[0]] += 10
      end[row, hits[-1]] += 10
  return start, end


def test_squad_eval_pipeline_decodes_gold_spans(vocab_file):
  with mock(examples=EXAMPLES):
    source = data.open_source('squad/v1.1', 'validation')
    batches = list(
        data.make_pipeline(
            'squad/v1.1',
            'validation',
            batch_size=5,
            train=False,
            vocab_file=vocab_file,
            **SMALL,
        )
    )
  arrays = squad_eval_arrays(batches)
  assert (arrays['example_index'] == -1).any()  # padded last batch
  start, end = oracle_logits(arrays, EXAMPLES)
  windows = (
      arrays['example_index'],
      arrays['offsets'],
      arrays['token_is_max_context'],
  )
  predictions = data.postprocess_squad(source, *windows, start, end)
  references = data.squad_references(source)
  assert predictions == {k: v[0] for k, v in references.items()}
  result = squad_metric.evaluate(predictions, references)
  assert result['exact_match'] == 100.0 and result['f1'] == 100.0
  # With room for 1-token answers only, 'in the park' cannot be predicted.
  short = data.postprocess_squad(
      source, *windows, start, end, max_answer_length=1
  )
  assert short['q0'] == 'Paris' and short['q1'] != 'in the park'


def test_squad_train_pipeline_on_random_mock_data(vocab_file):
  kwargs = dict(batch_size=4, train=True, seed=0, vocab_file=vocab_file)
  with mock(6):
    batches = take(data.make_pipeline('squad/v1.1', 'train', **kwargs), 3)
    again = take(data.make_pipeline('squad/v1.1', 'train', **kwargs), 3)
  for batch, other in zip(batches, again):
    np.testing.assert_array_equal(batch['input_ids'], other['input_ids'])
    assert (
        batch['input_ids'].shape == (4, 384)
        and batch['input_ids'].dtype == np.int32
    )
    assert set(batch) >= {'start_positions', 'end_positions', 'example_index'}
    assert 'offsets' not in batch
    assert (batch['input_ids'][:, 0] == CLS).all()
    assert (batch['start_positions'] <= batch['end_positions']).all()


def test_squad_train_shards_partition_windows(vocab_file):
  examples = EXAMPLES * 3
  with mock(examples=examples):
    n = len(
        text.SquadWindows(
            examples, vocab_file, options=text.SquadOptions(**SMALL)
        )
    )
    assert n % 2 == 0
    seen = [
        np.concatenate(
            [
                b['index']
                for b in take(
                    data.make_pipeline(
                        'squad/v1.1',
                        'train',
                        batch_size=1,
                        train=True,
                        vocab_file=vocab_file,
                        shard_index=s,
                        shard_count=2,
                        **SMALL,
                    ),
                    n // 2,
                )
            ]
        )
        for s in range(2)
    ]
  assert sorted(np.concatenate(seen)) == list(range(n))


def test_squad_options_are_checked():
  with pytest.raises(ValueError, match='max_seq_length=10'):
    text.SquadOptions(max_seq_length=10, max_query_length=8)


# ----------------------------------------------------------------------------
# Careless arguments.


def test_tokenizer_rejects_what_is_not_a_vocab_file(tmp_path, vocab_file):
  with pytest.raises(TypeError, match='vocab_file=None must be a path'):
    data.wordpiece_tokenizer(None)
  with pytest.raises(FileNotFoundError, match='is a directory; pass the vocab'):
    data.wordpiece_tokenizer(tmp_path)
  binary = tmp_path / 'vocab.bin'
  binary.write_bytes(b'\xff\xfe\x00\x01')
  with pytest.raises(ValueError, match='vocab.bin.*is not a WordPiece vocab'):
    data.wordpiece_tokenizer(binary)
  with pytest.raises(TypeError, match="lowercase='yes' must be True or False"):
    data.wordpiece_tokenizer(vocab_file, lowercase='yes')


@pytest.mark.parametrize(
    'name, options, error, message',
    [
        (
            'glue/foo',
            {},
            ValueError,
            "make_pipeline: name='glue/foo' is not supported",
        ),
        ('glue', {}, ValueError, "name='glue' is not supported"),
        ('squad/v2.0', {}, ValueError, "name='squad/v2.0' is not supported"),
        (
            'glue/sst2',
            dict(lowercase='yes'),
            TypeError,
            "lowercase='yes' must be True or False",
        ),
        (
            'glue/sst2',
            dict(max_seq_length=128.0),
            TypeError,
            'max_seq_length=128.0 must be an int',
        ),
        (
            'glue/sst2',
            dict(max_seq_length=2),
            ValueError,
            'GlueTransform: max_seq_length=2 must be >= 4',
        ),
        (
            'squad/v1.1',
            dict(max_seq_length=0),
            ValueError,
            'SquadOptions: max_seq_length=0 leaves no room',
        ),
        (
            'squad/v1.1',
            dict(doc_stride=0),
            ValueError,
            'SquadOptions: max_query_length=64 and doc_stride=0',
        ),
        (
            'squad/v1.1',
            dict(max_query_length=8.0),
            TypeError,
            'max_query_length=8.0 must be an int',
        ),
        (
            'glue/sst2',
            dict(normalize=True),
            ValueError,
            r"options \['normalize'\] are not supported for name='glue/sst2'",
        ),
    ],
)
def test_bad_text_arguments_are_named(
    tmp_path, vocab_file, name, options, error, message
):
  # `tmp_path` holds no dataset: a check made after opening the examples
  # would surface as FileNotFoundError instead.
  with pytest.raises(error, match=message):
    data.make_pipeline(
        name,
        'train',
        batch_size=2,
        train=True,
        vocab_file=vocab_file,
        data_dir=tmp_path,
        **options,
    )


def test_postprocess_squad_rejects_mismatched_arrays():
  examples = [{'id': b'q0', 'context': b'the cat sat'}]
  ok = dict(
      example_index=np.zeros(2, np.int32),
      offsets=np.full((2, 5, 2), -1, np.int32),
      token_is_max_context=np.zeros((2, 5), bool),
      start_logits=np.zeros((2, 5)),
      end_logits=np.zeros((2, 5)),
  )
  assert text.postprocess_squad(examples, **ok) == {'q0': ''}
  cases = [
      (
          dict(example_index=np.zeros(3, np.int32)),
          r'start_logits has shape \(2, 5\); expected \(3, length\)',
      ),
      (
          dict(example_index=np.zeros(2)),
          'example_index must be a 1-D integer array',
      ),
      (
          dict(end_logits=np.zeros((2, 6))),
          r'end_logits has shape \(2, 6\), expected \(2, 5\)',
      ),
      (
          dict(offsets=np.zeros((2, 5), np.int32)),
          r'offsets has shape \(2, 5\), expected \(2, 5, 2\)',
      ),
      (
          dict(token_is_max_context=np.zeros((5, 2), bool)),
          'token_is_max_context has shape',
      ),
      (
          dict(example_index=np.array([0, 4], np.int32)),
          'refers to example 4, but examples has 1',
      ),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      text.postprocess_squad(examples, **{**ok, **change})
  with pytest.raises(TypeError, match='n_best_size=2.5 must be an int'):
    text.postprocess_squad(examples, **ok, n_best_size=2.5)
  with pytest.raises(ValueError, match='max_answer_length=0 must be >= 1'):
    text.postprocess_squad(examples, **ok, max_answer_length=0)
