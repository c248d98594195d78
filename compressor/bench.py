"""Latency measured fairly: every runner on the same input, interleaved A B B A ..., after warm-up."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

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


def _system_busy_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Share of the machine's CPU that *other* processes used while the block ran (0..1, or None).

    Interleaving protects a comparison from drift, not from runtimes that suffer unequally when
    cores are oversubscribed (torch's threads slow far more than ONNX Runtime's), so a busy machine
    is reported rather than silently measured."""

    def __enter__(self) -> "OtherLoad":
        self.share: Optional[float] = None
        self._busy, self._own, self._wall = _system_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = _system_busy_seconds()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        self.share = min(1.0, max(0.0, others / max(wall * (os.cpu_count() or 1), 1e-9)))


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def benchmark_feed(tokenizer, texts: list[str], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """A realistic input of exactly batch_size x seq_len tokens, made from the evaluation text."""
    joined = " ".join(texts[:400])
    one = encode(tokenizer, [joined], max_length=seq_len, pad_to=seq_len)
    return {k: np.repeat(v, batch_size, axis=0) for k, v in one.items()}


# Runtimes keep their worker threads spinning for a while after each call (ONNX Runtime's intra-op
# pool, torch's OpenMP threads), so a call made right after another runtime's call competes with
# those threads: strictly alternating single calls measured MiniLM-L6 ORT fp32 at 21.5 ms against
# 8.1 ms alone, and int8 at 12.0 ms against 4.3 ms. Runners therefore take turns in blocks, and the
# first calls of each block, made while the other runtime's threads wind down, are not timed.
BLOCK = 10
SETTLE = 2


def interleaved(runners: list[Runner], feed: dict[str, np.ndarray], warmup: int, iterations: int,
                progress: Progress = Silent(), block: int = BLOCK, settle: int = SETTLE) -> dict[str, Latency]:
    """Time each runner `iterations` times. Runners take turns in blocks of `block` timed calls, each
    after `settle` untimed ones; the order reverses every round (A B B A ...) so that neither drift
    nor caches favour one side."""
    for runner in runners:
        for _ in range(warmup):
            runner(feed)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    rounds = -(-iterations // block)
    for i in progress.track(range(rounds), rounds, "benchmarking (interleaved)"):
        timed = min(block, iterations - i * block)
        for runner in (runners if i % 2 == 0 else runners[::-1]):
            for _ in range(settle):
                runner(feed)
            for _ in range(timed):
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
