"""Metrics on known outputs, and the benchmark's interleaving, with stand-in runners."""

import numpy as np
import pytest

from compressor.bench import interleaved
from compressor.data import Samples
from compressor.evaluate import _f1_macro, evaluate
from compressor.recipe import EvaluationConfig
from compressor.runners import Runner


class FixedRunner(Runner):
    """Returns per-text logits chosen by the test; records the order it was called in."""

    def __init__(self, name, logits_for, calls=None):
        self.name, self.backend, self.logits_for, self.calls = name, "test", logits_for, calls

    def __call__(self, feed):
        if self.calls is not None:
            self.calls.append(self.name)
        return np.stack([self.logits_for(row) for row in feed["input_ids"]])


class Tokenizer:
    def __call__(self, texts, **kwargs):
        ids = np.array([[len(t), 1] for t in texts])
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_classification_metrics_and_agreement():
    samples = Samples(texts=["a", "bb", "ccc", "dddd"], labels=[0, 1, 1, 0], source="mem")
    config = EvaluationConfig.model_validate({"data": {"path": "x.jsonl"}, "batch_size": 3})
    truth = FixedRunner("base", lambda row: np.array([1.0, 0.0]) if row[0] in (1, 4) else np.array([0.0, 1.0]))
    base = evaluate("text-classification", truth, Tokenizer(), samples, config)
    assert base.metrics == {"accuracy": 1.0, "f1_macro": 1.0, "agreement": 1.0}
    flipped = FixedRunner("cand", lambda row: np.array([0.0, 1.0]))  # always predicts 1
    cand = evaluate("text-classification", flipped, Tokenizer(), samples, config, reference=base)
    assert cand.metrics["accuracy"] == 0.5 and cand.metrics["agreement"] == 0.5
    assert cand.metrics["f1_macro"] == pytest.approx((0 + 2 * 2 / (2 * 2 + 2)) / 2)


def test_f1_macro_known_value():
    predicted, labels = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5 ; class 1: tp2 fp1 fn1 -> 4/6
    assert _f1_macro(predicted, labels) == pytest.approx((0.5 + 4 / 6) / 2)


def test_interleaved_alternates_and_counts():
    calls = []
    a = FixedRunner("a", lambda row: np.zeros(2), calls)
    b = FixedRunner("b", lambda row: np.zeros(2), calls)
    feed = {"input_ids": np.ones((2, 4), dtype=np.int64)}
    result = interleaved([a, b], feed, warmup=2, iterations=4)
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert result["a"].iterations == result["b"].iterations == 4
    stats = result["a"]
    assert stats.p50 <= stats.p90 <= stats.p95 <= stats.p99
    assert stats.throughput == pytest.approx(2 / (stats.mean / 1000))
