"""The SQuAD v1.1 metric on hand-made cases, scores worked out by hand."""

import pytest

from cram_jax.data import squad_metric as sm


@pytest.mark.parametrize(
    'raw, normalised',
    [
        ('The Eiffel Tower', 'eiffel tower'),
        ('  an   apple, a pear; the END.  ', 'apple pear end'),
        ("Rock 'n' roll!", 'rock n roll'),
        ('theatre another', 'theatre another'),  # articles only as words
        ('A', ''),
        ('U.S.A.', 'usa'),
    ],
)
def test_normalize_answer(raw, normalised):
  assert sm.normalize_answer(raw) == normalised


def test_exact_match_ignores_case_articles_punctuation():
  assert sm.exact_match_score('the Eiffel  tower.', 'Eiffel Tower') == 1.0
  assert sm.exact_match_score('Eiffel', 'Eiffel Tower') == 0.0


def test_f1_partial_overlap_by_hand():
  # pred {big, red, dog} vs gold {red, dog, barked}: 2 common words,
  # precision 2/3, recall 2/3, F1 2/3.
  assert sm.f1_score('the big red dog', 'a red dog barked') == pytest.approx(
      2 / 3
  )
  # pred {paris}, gold {paris, france}: P 1, R 1/2, F1 = 2 * 0.5 / 1.5.
  assert sm.f1_score('Paris', 'Paris, France') == pytest.approx(2 / 3)
  # Repeated words count with multiplicity: pred {a1 a1 b}, gold {a1 b b}:
  # common {a1: 1, b: 1} = 2, P = R = 2/3.
  assert sm.f1_score('x x y', 'x y y') == pytest.approx(2 / 3)
  assert sm.f1_score('cat', 'dog') == 0.0
  assert sm.f1_score('the', 'a') == 0.0  # both normalise to empty (v1.1)


def test_max_over_several_gold_answers():
  golds = ['Denver Broncos', 'The Broncos', 'Broncos']
  assert (
      sm.max_over_ground_truths(sm.exact_match_score, 'broncos', golds) == 1.0
  )
  # vs 'Denver Broncos': P 1/2, R 1/2 -> 1/2; vs 'Broncos': P 1/2, R 1 -> 2/3.
  assert sm.max_over_ground_truths(
      sm.f1_score, 'Carolina Broncos', golds
  ) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match='no ground truth'):
    sm.max_over_ground_truths(sm.f1_score, 'x', [])


def test_evaluate_percentages_and_missing_predictions():
  references = {
      'q1': ['Denver Broncos', 'Broncos'],
      'q2': ['Santa Clara, California'],
      'q3': ['1966'],
      'q4': ['gold'],
  }
  predictions = {
      'q1': 'the Broncos',
      'q2': 'Santa Clara',
      'q3': '1967',
      'extra': 'x',
  }
  result = sm.evaluate(predictions, references)
  # EM: q1 only -> 1/4. F1: q1 1, q2 P 1 R 2/3 -> 0.8, q3 0, q4 missing 0.
  assert result['exact_match'] == pytest.approx(25.0)
  assert result['f1'] == pytest.approx(100 * (1 + 0.8) / 4)
  assert result['num_questions'] == 4 and result['num_missing'] == 1
  with pytest.raises(ValueError, match='empty'):
    sm.evaluate({}, {})


@pytest.mark.parametrize(
    'predictions, references, error, message',
    [
        (
            None,
            {'q': ['a']},
            TypeError,
            'predictions must be a dict keyed by question id',
        ),
        (
            ['a'],
            {'q': ['a']},
            TypeError,
            'predictions must be a dict keyed by question id, got list',
        ),
        ({'q': 'a'}, [('q', ['a'])], TypeError, 'references must be a dict'),
        (
            {'q': ['a']},
            {'q': ['a']},
            TypeError,
            r"predictions\['q'\] must be the answer text \(a str\), got list",
        ),
        (
            {'q': None},
            {'q': ['a']},
            TypeError,
            r"predictions\['q'\] must be the answer text",
        ),
        # A bare string would be scored as one-character answers.
        (
            {'q': 'a'},
            {'q': 'a b'},
            TypeError,
            r"references\['q'\] must be a list of gold answer texts, got str",
        ),
        ({'q': 'a'}, {'q': [1]}, TypeError, r"references\['q'\] holds int 1"),
        (
            {'q': 'a'},
            {'q': []},
            ValueError,
            r"references\['q'\] has no ground truth answers",
        ),
        (
            {'x': 'a', 'y': 'b'},
            {'q': ['a']},
            ValueError,
            'none of the 2 prediction ids is among the 1 reference ids',
        ),
    ],
)
def test_evaluate_rejects_mismatched_inputs(
    predictions, references, error, message
):
  with pytest.raises(error, match=message):
    sm.evaluate(predictions, references)


def test_evaluate_scores_no_predictions_as_zero():
  # Nothing predicted is a valid (if poor) submission, not a mismatch.
  result = sm.evaluate({}, {'q': ['a']})
  assert result['exact_match'] == 0.0 and result['num_missing'] == 1
