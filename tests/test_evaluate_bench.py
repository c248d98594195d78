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
    base = evaluate("text-classification", truth, Tokenizer(), samples, config, class_names=["neg", "pos"])
    assert base.metrics == {"accuracy": 1.0, "f1_macro": 1.0, "precision_macro": 1.0, "recall_macro": 1.0,
                            "agreement": 1.0, "precision[neg]": 1.0, "recall[neg]": 1.0, "f1[neg]": 1.0,
                            "precision[pos]": 1.0, "recall[pos]": 1.0, "f1[pos]": 1.0}
    assert base.classes.confusion == [[2, 0], [0, 2]]
    flipped = FixedRunner("cand", lambda row: np.array([0.0, 1.0]))  # always predicts 1
    cand = evaluate("text-classification", flipped, Tokenizer(), samples, config, reference=base,
                    class_names=["neg", "pos"])
    assert cand.metrics["accuracy"] == 0.5 and cand.metrics["agreement"] == 0.5
    assert cand.metrics["f1_macro"] == pytest.approx((0 + 2 * 2 / (2 * 2 + 2)) / 2)
    # pos: predicted 4 times, right twice; neg: never predicted (precision 0 by convention)
    assert cand.metrics["precision[pos]"] == 0.5 and cand.metrics["recall[pos]"] == 1.0
    assert cand.metrics["precision[neg]"] == 0.0 and cand.metrics["recall[neg]"] == 0.0
    assert cand.metrics["precision_macro"] == 0.25 and cand.metrics["recall_macro"] == 0.5
    assert cand.classes.confusion == [[0, 2], [0, 2]] and [r.support for r in cand.classes.rows] == [2, 2]


def test_generation_max_samples_counts_windows_not_texts():
    class WordTokenizer:
        bos_token_id, eos_token_id = 7, None

        def __call__(self, text, **kwargs):
            return {"input_ids": [len(word) for word in text.split()]}

    texts = ["a bb ccc"] * 10  # 3 tokens per text: 30 tokens, 10 windows of BOS + 3
    samples = Samples(texts=texts, labels=None, source="mem")
    config = EvaluationConfig.model_validate({"data": {"path": "x.txt"}, "max_length": 4, "max_samples": 5})
    uniform = FixedRunner("base", lambda row: np.zeros((len(row), 8)))
    result = evaluate("text-generation", uniform, WordTokenizer(), samples, config)
    assert result.samples == 5  # five windows, although five texts hold only three
    assert result.metrics["perplexity"] == pytest.approx(8.0)  # uniform over 8 tokens


def test_class_table_names_every_class_and_falls_back_to_indices():
    from compressor.evaluate import class_table, higher_is_better, is_task_metric

    predicted, labels = np.array([0, 2, 2]), np.array([0, 0, 2])
    table = class_table(predicted, labels, ["a", "b"])  # class 2 has no name; b occurs nowhere
    assert [r.label for r in table.rows] == ["a", "b", "2"]
    assert table.confusion == [[1, 0, 1], [0, 0, 0], [0, 0, 1]]
    assert (table.rows[0].precision, table.rows[0].recall) == (1.0, 0.5)
    assert table.rows[2].f1 == pytest.approx(2 / 3)
    assert higher_is_better("recall[b]") and not higher_is_better("perplexity")
    assert is_task_metric("text-classification", "f1[POSITIVE]")
    assert not is_task_metric("text-generation", "f1[POSITIVE]") and not is_task_metric("text-classification", "f2[x]")


def test_macro_averages_leave_out_named_classes_the_data_never_shows():
    samples = Samples(texts=["a", "bb", "ccc", "dddd"], labels=[0, 1, 1, 0], source="mem")
    config = EvaluationConfig.model_validate({"data": {"path": "x.jsonl"}, "batch_size": 4})
    perfect = FixedRunner("base", lambda row: np.array([1.0, 0.0, -1.0]) if row[0] in (1, 4) else
                          np.array([0.0, 1.0, -1.0]))
    result = evaluate("text-classification", perfect, Tokenizer(), samples, config,
                      class_names=["neg", "pos", "neutral"])
    assert result.metrics["recall[neutral]"] == 0.0  # reported, never seen ...
    assert result.metrics["precision_macro"] == result.metrics["recall_macro"] == result.metrics["f1_macro"] == 1.0


def test_f1_macro_known_value():
    predicted, labels = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5 ; class 1: tp2 fp1 fn1 -> 4/6
    assert _f1_macro(predicted, labels) == pytest.approx((0.5 + 4 / 6) / 2)


def test_interleaved_alternates_and_counts():
    calls = []
    a = FixedRunner("a", lambda row: np.zeros(2), calls)
    b = FixedRunner("b", lambda row: np.zeros(2), calls)
    feed = {"input_ids": np.ones((2, 4), dtype=np.int64)}
    result = interleaved([a, b], feed, warmup=2, iterations=5, block=2, settle=1)
    # warm-up, then blocks of 1 untimed + 2 timed calls, order reversed every round, last block short
    assert calls == ["a"] * 2 + ["b"] * 2 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 2 + ["b"] * 2
    assert result["a"].iterations == result["b"].iterations == 5
    stats = result["a"]
    assert stats.p50 <= stats.p90 <= stats.p95 <= stats.p99
    assert stats.throughput == pytest.approx(2 / (stats.mean / 1000))


def _busy_for(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_other_load_counts_other_processes_not_our_own_work(monkeypatch):
    # Counters are faked so that whatever else runs on the machine (a parallel test worker) cannot
    # change the verdict: 2 cores for 1 s, the whole machine busy 1.5 CPU-seconds, 1.0 of them ours.
    import os

    from compressor import bench

    clock = {"busy": 100.0, "own": 10.0, "wall": 50.0}
    monkeypatch.setattr(bench, "_system_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(bench, "_own_cpu_seconds", lambda: clock["own"])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with bench.OtherLoad() as load:
        clock.update(busy=101.5, own=11.0, wall=51.0)
    assert load.share == pytest.approx(0.25)  # 0.5 CPU-seconds of 2 available were someone else's
    with bench.OtherLoad() as own_only:
        clock.update(busy=102.5, own=12.0, wall=52.0)
    assert own_only.share == 0.0


def test_other_load_sees_a_busy_child_process():
    import os
    import subprocess
    import sys

    from compressor.bench import OtherLoad

    one_core = 1 / (os.cpu_count() or 1)
    child = subprocess.Popen([sys.executable, "-c", "import time\nend=time.time()+1.5\nwhile time.time()<end: pass"])
    with OtherLoad() as other:
        child.wait()
    if other.share is None:
        pytest.skip("no /proc/stat on this platform")
    assert other.share > 0.6 * one_core  # a busy neighbour on one core shows up


def test_busy_machine_note():
    from pathlib import Path

    from compressor.recipe import parse_recipe
    from compressor.report import build_report, environment

    from .reports import baseline_side, result_side
    from .test_recipe import GOOD

    recipe = parse_recipe(GOOD, "r.yaml")
    base, result = baseline_side(), result_side()
    quiet = build_report(recipe, Path("/nonexistent"), base, result, [], [], 1, "x", environment(2),
                         other_cpu_share=0.05)
    busy = build_report(recipe, Path("/nonexistent"), base, result, [], [], 1, "x", environment(2),
                        other_cpu_share=0.6)
    assert quiet.notes == [] and quiet.benchmark.other_cpu_share == 0.05
    assert "60% of the CPU" in busy.notes[0]


def test_perplexity_windows_start_with_bos_and_score_every_text_token_once(tiny_llama):
    """The convention in docs/RECIPES.md: each window is BOS + the next length-1 tokens of the text, and
    perplexity is exp of the mean negative log-likelihood of every text token given what precedes it
    in its window. Checked against a direct computation with the model."""
    import torch

    from compressor.checkpoint import load_tokenizer, load_torch_model
    from compressor.artifacts import TorchModel
    from compressor.data import token_windows
    from compressor.runners import make_runner

    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer("a film")["input_ids"][0] == tokenizer.bos_token_id == 2  # it adds BOS, as Llama's does
    texts = ["the film was good and the plot was fine", "a dull movie but the cast is great"] * 6
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    windows = token_windows(tokenizer, texts, 16, None)
    # BOS once at the start of every window, never inside the text stream
    assert (windows[:, 0] == 2).all() and (windows[:, 1:] != 2).all()
    assert windows[:, 1:].ravel().tolist() == stream[: windows.shape[0] * 15]

    samples = Samples(texts=texts, labels=None, source="mem")
    config = EvaluationConfig.model_validate({"data": {"path": "x.txt"}, "max_length": 16, "batch_size": 2})
    artifact = TorchModel(tiny_llama, "text-generation")
    measured = evaluate("text-generation", make_runner(artifact, "tiny", threads=1), tokenizer, samples, config)

    module = load_torch_model(artifact)
    with torch.no_grad():
        logits = module(input_ids=torch.from_numpy(windows)).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert measured.samples == len(windows)
    assert measured.metrics["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
