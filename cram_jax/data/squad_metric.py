"""The official SQuAD v1.1 exact-match and F1 metric.

Both compare normalised answers: lower-cased, punctuation removed, the
articles "a", "an", "the" removed, whitespace collapsed. F1 is over the bags
of normalised words. Each question scores the maximum over its gold answers;
the totals are percentages over all questions of the references (a question
without a prediction scores 0), as in the v1.1 evaluation script.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(text: str) -> str:
  """Lower-cases, strips punctuation and articles, collapses whitespace."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
  """1.0 if the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
  """Harmonic mean of word precision and recall after normalisation.

  As in v1.1, an empty prediction or answer scores 0 (v2.0 special-cases
  two empty strings as 1; v1.1 has no unanswerable questions).
  """
  predicted = normalize_answer(prediction).split()
  gold = normalize_answer(ground_truth).split()
  common = collections.Counter(predicted) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(predicted)
  recall = same / len(gold)
  return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(
    metric: Callable[[str, str], float],
    prediction: str,
    ground_truths: Sequence[str],
) -> float:
  """The best score of `prediction` against any of `ground_truths`."""
  if not ground_truths:
    raise ValueError('max_over_ground_truths: no ground truth answers')
  return max(metric(prediction, truth) for truth in ground_truths)


def _check_inputs(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> None:
  """Raises on inputs the official script would mis-score silently."""
  for name, value in (('predictions', predictions), ('references', references)):
    if not isinstance(value, Mapping):
      raise TypeError(
          f'evaluate: {name} must be a dict keyed by question id, got'
          f' {type(value).__name__}'
      )
  if not references:
    raise ValueError('evaluate: references is empty')
  for qid, text in predictions.items():
    if not isinstance(text, str):
      raise TypeError(
          f'evaluate: predictions[{qid!r}] must be the answer text (a str),'
          f' got {type(text).__name__} {text!r}'
      )
  for qid, truths in references.items():
    # A bare string would be scored as a list of one-character answers.
    if isinstance(truths, str) or not isinstance(truths, Sequence):
      raise TypeError(
          f'evaluate: references[{qid!r}] must be a list of gold answer'
          f' texts, got {type(truths).__name__} {truths!r}'
      )
    if not truths:
      raise ValueError(
          f'evaluate: references[{qid!r}] has no ground truth answers'
      )
    for truth in truths:
      if not isinstance(truth, str):
        raise TypeError(
            f'evaluate: references[{qid!r}] holds {type(truth).__name__}'
            f' {truth!r}; gold answers must be strings'
        )
  if predictions and not any(qid in references for qid in predictions):
    raise ValueError(
        f'evaluate: none of the {len(predictions)} prediction ids is among'
        f' the {len(references)} reference ids (e.g. {next(iter(predictions))!r}'
        f' vs {next(iter(references))!r}): predictions and references come'
        ' from different splits or datasets'
    )


def evaluate(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
  """SQuAD v1.1 exact match and F1, in percent.

  Args:
    predictions: `{question id: predicted answer text}`.
    references: `{question id: [gold answer texts]}`; every id counts,
      missing predictions score 0.

  Returns:
    `{'exact_match': ..., 'f1': ..., 'num_questions': ...,
    'num_missing': ...}`.

  Raises:
    TypeError: not dicts, a prediction that is not a string, or references
      that are not lists of strings (a bare string included).
    ValueError: no references, a question without gold answers, or no
      prediction id among the reference ids.
  """
  _check_inputs(predictions, references)
  exact = f1 = 0.0
  missing = 0
  for qid, truths in references.items():
    if qid not in predictions:
      missing += 1
      continue
    exact += max_over_ground_truths(exact_match_score, predictions[qid], truths)
    f1 += max_over_ground_truths(f1_score, predictions[qid], truths)
  total = len(references)
  return {
      'exact_match': 100.0 * exact / total,
      'f1': 100.0 * f1 / total,
      'num_questions': total,
      'num_missing': missing,
  }
