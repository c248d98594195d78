"""Latency measured fairly: every runner on the same input, interleaved A B B A ..., after warm-up."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .data import encode
from .progress import Progress, Silent
from .runners import Runner


@dataclass
class Latency:
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    throughput: float  # samples per second at the benchmark batch size
    iterations: int

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def benchmark_feed(tokenizer, texts: list[str], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """A realistic input of exactly batch_size x seq_len tokens, made from the evaluation text."""
    joined = " ".join(texts[:400])
    one = encode(tokenizer, [joined], max_length=seq_len, pad_to=seq_len)
    return {k: np.repeat(v, batch_size, axis=0) for k, v in one.items()}


def interleaved(runners: list[Runner], feed: dict[str, np.ndarray], warmup: int, iterations: int,
                progress: Progress = Silent()) -> dict[str, Latency]:
    """Time each runner `iterations` times; each round visits all runners, reversing order every other
    round so that neither caches nor thermal drift favour one side."""
    for runner in runners:
        for _ in range(warmup):
            runner(feed)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in progress.track(range(iterations), iterations, "benchmarking (interleaved)"):
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            start = time.perf_counter()
            runner(feed)
            times[runner.name].append((time.perf_counter() - start) * 1000)
    batch = next(iter(feed.values())).shape[0]
    result = {}
    for name, samples in times.items():
        ms = np.asarray(samples)
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        result[name] = Latency(float(p50), float(p90), float(p95), float(p99), float(ms.mean()),
                               float(batch / (ms.mean() / 1000)), len(ms))
    return result
