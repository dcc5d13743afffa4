import pytest

from workshop.evaluation import exact_match, f1, normalize_answer, squad_scores


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"


@pytest.mark.parametrize("prediction, reference, em, f", [
    ("Paris", "paris", 1.0, 1.0),
    ("the Paris", "Paris.", 1.0, 1.0),
    ("in Paris", "Paris", 0.0, 2 / 3),           # precision 1/2, recall 1
    ("Lyon", "Paris", 0.0, 0.0),
    ("red blue green", "blue green yellow", 0.0, 2 / 3),
])
def test_exact_match_and_f1(prediction, reference, em, f):
    assert exact_match(prediction, reference) == em
    assert f1(prediction, reference) == pytest.approx(f)


def test_squad_scores_take_the_best_reference_and_average():
    scores = squad_scores(["Paris", "in Lyon"], [["Lyon", "Paris"], ["Lyon"]])
    assert scores == {"exact_match": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}
