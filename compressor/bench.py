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
    """Time each runner `iterations` times, interleaved (see Timings.extend); the latency of each."""
    timings = Timings([r.name for r in runners], batch=next(iter(feed.values())).shape[0])
    warm_up(runners, feed, warmup)
    timings.extend(runners, feed, iterations, progress, block, settle)
    return {name: timings.latency(name) for name in timings.names}


def warm_up(runners: list[Runner], feed: dict[str, np.ndarray], calls: int) -> None:
    for runner in runners:
        for _ in range(calls):
            runner(feed)


class Timings:
    """Every timed call of every runner, in the order taken, with the round it was taken in. In each
    round every runner times one block of calls right after the other's: the blocks of one round are
    an interleaved pair."""

    def __init__(self, names: list[str], batch: int):
        self.names = names
        self.batch = batch
        self.calls: dict[str, list[float]] = {name: [] for name in names}
        self.round_of: dict[str, list[int]] = {name: [] for name in names}
        self.rounds = 0

    def extend(self, runners: list[Runner], feed: dict[str, np.ndarray], iterations: int,
               progress: Progress = Silent(), block: int = BLOCK, settle: int = SETTLE) -> None:
        """Time each runner `iterations` more times. Runners take turns in blocks of `block` timed calls,
        each after `settle` untimed ones; the order reverses every round (A B B A ...), continuing from
        earlier rounds, so that neither drift nor caches favour one side."""
        rounds = -(-iterations // block)
        for i in progress.track(range(rounds), rounds, "benchmarking (interleaved)"):
            timed = min(block, iterations - i * block)
            for runner in (runners if self.rounds % 2 == 0 else runners[::-1]):
                for _ in range(settle):
                    runner(feed)
                for _ in range(timed):
                    start = time.perf_counter()
                    runner(feed)
                    self.calls[runner.name].append((time.perf_counter() - start) * 1000)
                    self.round_of[runner.name].append(self.rounds)
            self.rounds += 1

    def latency(self, name: str) -> Latency:
        ms = np.asarray(self.calls[name])
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return Latency(float(p50), float(p90), float(p95), float(p99), float(ms.mean()),
                       float(self.batch / (ms.mean() / 1000)), len(ms))

    def speedup(self, baseline: str, candidate: str) -> float:
        """p50 of the baseline / p50 of the candidate: what latency.min_speedup is checked on."""
        return float(np.median(self.calls[baseline]) / np.median(self.calls[candidate]))

    def _blocks(self, name: str, rounds: np.ndarray) -> np.ndarray:
        """The runner's calls as a (round, call) array, NaN where a round had fewer calls."""
        calls, where = np.asarray(self.calls[name]), np.asarray(self.round_of[name])
        blocks = np.full((len(rounds), max(np.bincount(where).max(), 1)), np.nan)
        for row, round_index in enumerate(rounds):
            taken = calls[where == round_index]
            blocks[row, :len(taken)] = taken
        return blocks

    def speedup_interval(self, baseline: str, candidate: str, confidence: float, resamples: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
        """Bootstrap confidence interval of the speed-up, in two stages: rounds (interleaved pairs of
        blocks) resampled with replacement, then calls within each chosen block, and the p50 ratio
        recomputed on each resample. Rounds are the outer unit because a disturbance on a shared
        machine lasts longer than one call and slows the calls around it together (resampling single
        calls gave intervals too narrow to trust); calls are the inner one so that even a single round
        has an interval. Seeded, so equal timings give an equal interval."""
        rounds = np.intersect1d(self.round_of[baseline], self.round_of[candidate])
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(rounds), size=(resamples, len(rounds)))
        medians = []
        for name in (baseline, candidate):
            blocks = self._blocks(name, rounds)
            counts = np.sum(~np.isnan(blocks), axis=1)[picks]  # calls in each chosen round
            inner = (rng.random(picks.shape + blocks.shape[1:]) * counts[..., None]).astype(int)
            values = blocks[picks[..., None], inner]
            values[np.arange(blocks.shape[1]) >= counts[..., None]] = np.nan  # a short round keeps its count
            medians.append(np.nanmedian(values.reshape(resamples, -1), axis=1))
        tail = (1.0 - confidence) / 2 * 100
        low, high = np.percentile(medians[0] / medians[1], [tail, 100 - tail])
        return float(low), float(high)


@dataclass
class SpeedupEstimate:
    """A candidate's speed-up over the baseline with its confidence interval, as the report gives it."""

    speedup: float
    interval: tuple[float, float]
    confidence: float
    rounds: int  # interleaved pairs of blocks of calls the interval was resampled from
    marginal: bool  # the interval still holds a latency threshold after re-measuring

    def straddles(self, threshold: float) -> bool:
        return self.interval[0] < threshold < self.interval[1]

    def as_dict(self) -> dict:
        return {"speedup": round(self.speedup, 4), "interval": [round(v, 4) for v in self.interval],
                "confidence": self.confidence, "rounds": self.rounds, "marginal": self.marginal}


# Calls added per runner each time the interval still straddles a threshold.
REMEASURE_CALLS = 20


def measure(runners: list[Runner], feed: dict[str, np.ndarray], bench, thresholds: dict[str, list[float]],
            progress: Progress = Silent()) -> tuple[Timings, dict[str, SpeedupEstimate], float]:
    """Time the baseline (runners[0]) and every candidate interleaved, then, while a candidate's speed-up
    interval holds one of its latency thresholds, time all of them again, up to the recipe's
    `benchmark.max_remeasure_seconds`. Returns the timings, each candidate's estimate and the seconds
    spent re-measuring."""
    timings = Timings([r.name for r in runners], batch=next(iter(feed.values())).shape[0])
    warm_up(runners, feed, bench.warmup)
    timings.extend(runners, feed, bench.iterations, progress)
    base = runners[0].name

    def unsettled() -> list[str]:
        out = []
        for runner in runners[1:]:
            low, high = timings.speedup_interval(base, runner.name, bench.confidence)
            if any(low < t < high for t in thresholds.get(runner.name, [])):
                out.append(runner.name)
        return out

    started, extra = time.perf_counter(), 0.0
    while True:
        waiting = unsettled()
        if not waiting or time.perf_counter() - started >= bench.max_remeasure_seconds:
            break
        progress.phase(f"speed-up too close to its threshold to call: timing {', '.join(waiting)} again")
        timings.extend(runners, feed, REMEASURE_CALLS, progress)
        extra = time.perf_counter() - started
    estimates = {}
    for runner in runners[1:]:
        estimates[runner.name] = SpeedupEstimate(
            timings.speedup(base, runner.name), timings.speedup_interval(base, runner.name, bench.confidence),
            bench.confidence, timings.rounds, runner.name in waiting)
    return timings, estimates, extra
