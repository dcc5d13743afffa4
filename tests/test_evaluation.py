"""Exact match and F1 equal to the official SQuAD v1.1 evaluation, on hand cases and on generated hard ones."""

import collections
import random
import re
import string

import pytest

from workshop.evaluation import exact_match, f1, normalize_answer, squad_scores


# ---- The reference: the official SQuAD v1.1 evaluation script's functions (evaluate-v1.1.py, Rajpurkar et al.
# 2016), transcribed literally here so that the test does not share the workshop's code. Only `evaluate` is
# reshaped: it reads predictions by question id from the official JSON; here the i-th prediction answers
# the i-th question.
def official_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_exact_match_score(prediction, ground_truth):
    return (official_normalize_answer(prediction) == official_normalize_answer(ground_truth))


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def official_evaluate(predictions, references):
    f1 = exact_match = total = 0
    for prediction, ground_truths in zip(predictions, references):
        total += 1
        exact_match += official_metric_max_over_ground_truths(official_exact_match_score, prediction, ground_truths)
        f1 += official_metric_max_over_ground_truths(official_f1_score, prediction, ground_truths)
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {'exact_match': exact_match, 'f1': f1}


# ---- Hard cases, written by hand: each names what a plausible mistake would get wrong.
HARD_CASES = [
    ("the the the", ["the"]),                          # nothing but articles: empty after normalising
    ("", ["Paris"]),                                   # empty prediction: F1 0, not a division by zero
    ("Paris", [""]),                                   # empty reference
    ("", [""]),                                        # both empty: v1.1 scores F1 0 (v2.0 would say 1)
    ("New York New York", ["New York"]),               # repeated tokens: a multiset, not a set (F1 2/3)
    ("New York", ["New York New York"]),               # ... and the other way round
    ("a b a b a", ["a b b"]),                          # 'a' is an article, 'b' repeats
    ("theatre thesis", ["the atre"]),                  # articles only as whole words
    ("An apple a day", ["apple day"]),                 # articles anywhere, any case
    ("U.S.A.", ["USA"]),                               # punctuation inside a word is dropped, not a space
    ("rock-and-roll", ["rock and roll"]),              # ... so a hyphen joins: no match
    ("$1,000", ["1000"]),
    ("  Eiffel \t Tower\n", ["eiffel tower"]),         # any whitespace
    ("Eiffel\u00a0Tower", ["Eiffel Tower"]),           # a no-break space splits too (str.split)
    ("“Paris”", ["Paris"]),                            # typographic quotes are not string.punctuation
    ("café", ["CAFÉ"]),                                # unicode lower-casing
    ("naïve the", ["naive"]),
    ("Lyon", ["Paris", "Lyon", "lyon."]),              # several references: the best one
    ("in Paris France", ["Paris", "France", "Paris, France"]),
    ("Paris Paris", ["Paris", "Paris Paris Paris"]),
    ("the Eiffel Tower in Paris", ["Eiffel Tower", "the tower"]),
]


def generated_cases(n=400, seed=0):
    """Predictions and references drawn from a small vocabulary rich in what normalisation touches."""
    words = ["the", "a", "an", "The", "A", "AN", "paris", "Paris", "tower", "tower.", "new", "york", "York,",
             "1,000", "U.S.", "café", "CAFÉ", "’s", "\"quoted\"", "(it)", "an-other", "the.", "thea", "x", "x", "x"]
    spaces = [" ", "  ", "\t", "\n", "\u00a0"]
    rng = random.Random(seed)

    def text():
        tokens = [rng.choice(words) for _ in range(rng.randint(0, 6))]
        return "".join(t + rng.choice(spaces) for t in tokens).strip() if rng.random() < 0.8 else \
            "".join(t + rng.choice(spaces) for t in tokens)

    return [(text(), [text() for _ in range(rng.randint(1, 3))]) for _ in range(n)]


CASES = HARD_CASES + generated_cases()


def test_the_generated_cases_reach_every_branch_of_the_definition():
    """The cases are only as good as their coverage: repeated tokens with partial overlap, empty
    normalised answers, several references where the best is not the first."""
    norm = official_normalize_answer
    assert any(len(set(norm(p).split())) < len(norm(p).split()) and 0 < official_f1_score(p, refs[0]) < 1
               for p, refs in CASES)
    assert any(norm(p) == "" and p for p, _ in CASES)
    assert any(official_f1_score(p, refs[0]) < official_metric_max_over_ground_truths(official_f1_score, p, refs)
               for p, refs in CASES)
    # the set-based F1 (a mistake a reader makes easily) differs from the official one on these cases
    set_f1 = [len(set(norm(p).split()) & set(norm(r).split())) for p, refs in CASES for r in refs]
    bag_f1 = [sum((collections.Counter(norm(p).split()) & collections.Counter(norm(r).split())).values())
              for p, refs in CASES for r in refs]
    assert set_f1 != bag_f1


@pytest.mark.parametrize("prediction, references", HARD_CASES)
def test_scores_equal_the_official_definitions_on_hard_cases(prediction, references):
    for reference in references:
        assert normalize_answer(reference) == official_normalize_answer(reference)
        assert exact_match(prediction, reference) == float(official_exact_match_score(prediction, reference))
        # exact: both divide the same integers in the same order
        assert f1(prediction, reference) == official_f1_score(prediction, reference)
    assert squad_scores([prediction], [references]) == official_evaluate([prediction], [references])


def test_scores_equal_the_official_definitions_on_generated_cases():
    predictions, references = zip(*CASES)
    ours = [(normalize_answer(p), [(exact_match(p, r), f1(p, r)) for r in refs]) for p, refs in CASES]
    official = [(official_normalize_answer(p), [(float(official_exact_match_score(p, r)), official_f1_score(p, r))
                                                for r in refs]) for p, refs in CASES]
    assert ours == official
    # The totals sum the same floats in the same order: equal to the last bit. Tolerance 1e-12 in case a
    # refactoring reorders the sum (then they differ by a few ulp of 100); the smallest real bug tried (F1 on
    # a set of tokens) moves the F1 total by 0.6 points here.
    scores, reference = squad_scores(list(predictions), list(references)), official_evaluate(predictions, references)
    assert scores == pytest.approx(reference, rel=1e-12, abs=0)


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"


@pytest.mark.parametrize("prediction, reference, em, f", [
    ("Paris", "paris", 1.0, 1.0),
    ("the Paris", "Paris.", 1.0, 1.0),
    ("in Paris", "Paris", 0.0, 2 / 3),           # precision 1/2, recall 1
    ("Lyon", "Paris", 0.0, 0.0),
    ("red blue green", "blue green yellow", 0.0, 2 / 3),
    ("New York New York", "New York", 0.0, 2 / 3),  # by hand: 2 shared of 4 and of 2 -> 2 * 1/2 * 1 / (3/2)
])
def test_exact_match_and_f1(prediction, reference, em, f):
    assert exact_match(prediction, reference) == em
    assert f1(prediction, reference) == pytest.approx(f)


def test_squad_scores_take_the_best_reference_and_average():
    scores = squad_scores(["Paris", "in Lyon"], [["Lyon", "Paris"], ["Lyon"]])
    assert scores == {"exact_match": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}
    assert squad_scores([], []) == {"exact_match": None, "f1": None}
