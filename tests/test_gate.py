"""Gate arithmetic: direction per metric, relative drops, margins, speed-up and size ratios."""

import pytest

from compressor.errors import UserError
from compressor.gate import check_evaluation, check_goals
from compressor.recipe import Goals, parse_recipe

from .reports import result_side


def measured(metrics, p50=10.0, p95=12.0, size=100.0):
    return result_side(metrics, p50, p95, size)


def test_accuracy_drop_absolute_and_relative():
    goals = Goals.model_validate({"accuracy": [{"metric": "accuracy", "max_drop": 0.01, "max_drop_pct": 1.0}]})
    [absolute, relative] = check_goals(goals, measured({"accuracy": 0.80}), measured({"accuracy": 0.792}))
    assert absolute.measured == pytest.approx(0.008) and absolute.passed and absolute.margin == pytest.approx(0.002)
    assert relative.measured == pytest.approx(1.0) and relative.passed  # 0.008 / 0.80 = exactly 1%
    [absolute, relative] = check_goals(goals, measured({"accuracy": 0.80}), measured({"accuracy": 0.78}))
    assert not absolute.passed and absolute.margin == pytest.approx(-0.01) and not relative.passed


def test_perplexity_is_lower_is_better():
    goals = Goals.model_validate({"accuracy": [{"metric": "perplexity", "max_drop_pct": 5}]})
    [worse] = check_goals(goals, measured({"perplexity": 30.0}), measured({"perplexity": 33.0}))
    assert worse.measured == pytest.approx(10.0) and not worse.passed
    [better] = check_goals(goals, measured({"perplexity": 30.0}), measured({"perplexity": 29.0}))
    assert better.measured < 0 and better.passed


def test_perplexity_that_improves_while_predictions_disagree_is_a_suspect_evaluation():
    base = measured({"perplexity": 1147.0, "top1_agreement": 1.0})
    # the case seen on a BOS-expecting model scored without BOS: a "-2.8% drop" at 31% agreement
    [row] = check_evaluation("text-generation", base, measured({"perplexity": 1115.0, "top1_agreement": 0.31}))
    assert not row.passed and row.goal == "evaluation.consistent" and "suspect evaluation" in row.note
    [row] = check_evaluation("text-generation", base, measured({"perplexity": 1115.0, "top1_agreement": 0.93}))
    assert row.passed and row.note is None  # a small improvement by a faithful model is believable
    [row] = check_evaluation("text-generation", base, measured({"perplexity": 3000.0, "top1_agreement": 0.2}))
    assert row.passed  # plainly worse: the perplexity and fidelity goals judge it, not this check
    assert check_evaluation("text-classification", base, measured({"accuracy": 0.5})) == []


def test_language_model_recipe_that_gates_on_perplexity_needs_a_fidelity_goal():
    text = """name: lm
task: text-generation
stages: [{type: quantize, scheme: int8-weight-only}]
evaluation: {data: {dataset: lee-background}}
goals:
  accuracy:
    - {metric: perplexity, max_drop_pct: 5}
"""
    with pytest.raises(UserError, match=r"lm.yaml:5: goals: .*fidelity goal.*top1_agreement"):
        parse_recipe(text, "lm.yaml")
    parse_recipe(text + "    - {metric: top1_agreement, min: 0.9}\n", "lm.yaml")


def test_absolute_floor_and_unknown_metric():
    goals = Goals.model_validate({"accuracy": [{"metric": "cosine_min", "min": 0.99}]})
    [floor] = check_goals(goals, measured({"cosine_min": 1.0}), measured({"cosine_min": 0.985}))
    assert not floor.passed and floor.margin == pytest.approx(-0.005)
    bad = Goals.model_validate({"accuracy": [{"metric": "bleu", "min": 1}]})
    with pytest.raises(UserError, match="'bleu' is not measured"):
        check_goals(bad, measured({"cosine_min": 1.0}), measured({"cosine_min": 1.0}))


def test_latency_and_size():
    goals = Goals.model_validate({"latency": {"min_speedup": 2.0, "max_p95_ms": 5.0}, "size": {"max_ratio": 0.3}})
    speedup, p95, size = check_goals(goals, measured({}, p50=10.0, size=100.0), measured({}, p50=4.0, p95=6.0, size=25.0))
    assert speedup.measured == pytest.approx(2.5) and speedup.passed
    assert p95.measured == 6.0 and not p95.passed and p95.margin == pytest.approx(-1.0)
    assert size.measured == pytest.approx(0.25) and size.passed
