"""The speed-up's bootstrap interval, re-measuring close calls up to the recipe's budget, and how the
gate and report mark a marginal verdict."""

import numpy as np
import pytest

from compressor.bench import Timings, measure
from compressor.gate import check_goals, check_regression, machine_differences, speedup_thresholds
from compressor.recipe import BenchmarkConfig, Goals, RegressionGoals
from compressor.report import environment, junit, markdown
from compressor.report_schema import GateRow
from compressor.runners import Runner

from .reports import baseline_side, report, result_side, speedup


def _timings(base_ms, cand_ms, block=10) -> Timings:
    timings = Timings(["base", "cand"], batch=1)
    timings.calls = {"base": list(base_ms), "cand": list(cand_ms)}
    timings.round_of = {name: [i // block for i in range(len(calls))] for name, calls in timings.calls.items()}
    timings.rounds = -(-len(base_ms) // block)
    return timings


def test_interval_holds_the_true_speedup_and_narrows_with_more_rounds():
    rng = np.random.default_rng(1)
    few = _timings(10 + rng.normal(0, 1, 30), 5 + rng.normal(0, 0.5, 30))
    many = _timings(10 + rng.normal(0, 1, 600), 5 + rng.normal(0, 0.5, 600))
    for timings in (few, many):
        low, high = timings.speedup_interval("base", "cand", 0.95)
        assert low < timings.speedup("base", "cand") < high
        assert low < 2.0 < high
    few_width = np.subtract(*few.speedup_interval("base", "cand", 0.95)[::-1])
    many_width = np.subtract(*many.speedup_interval("base", "cand", 0.95)[::-1])
    assert many_width < few_width / 2  # about 1/sqrt(20) as wide
    # A higher confidence gives a wider interval; equal timings give an equal (seeded) interval.
    assert np.subtract(*few.speedup_interval("base", "cand", 0.99)[::-1]) > few_width
    assert few.speedup_interval("base", "cand", 0.95) == few.speedup_interval("base", "cand", 0.95)


def test_rounds_not_calls_are_resampled_so_slow_spells_widen_the_interval():
    # The machine slows the baseline by up to 30% for whole rounds at a time (a neighbour's burst):
    # resampled by round, the interval reflects that; resampled call by call it would be much narrower.
    rng = np.random.default_rng(2)
    spells = np.repeat(1 + 0.3 * rng.random(12), 10)
    base, cand = 10 * spells + rng.normal(0, 0.2, 120), 5 + rng.normal(0, 0.1, 120)
    by_round = _timings(base, cand).speedup_interval("base", "cand", 0.95)
    by_call = _timings(base, cand, block=1).speedup_interval("base", "cand", 0.95)
    assert by_round[1] - by_round[0] > 1.5 * (by_call[1] - by_call[0])


class Clock:
    """Stands in for time.perf_counter: runners advance it, so timings are exact and repeatable."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ClockRunner(Runner):
    """Takes `ms` milliseconds of the fake clock per call, with seeded noise of `jitter` ms."""

    def __init__(self, name, clock, ms, jitter=0.05, seed=0):
        self.name, self.backend, self.clock, self.ms = name, "test", clock, ms
        self.jitter, self.rng = jitter, np.random.default_rng(seed)

    def __call__(self, feed):
        self.clock.now += (self.ms + self.rng.normal(0, self.jitter)) / 1000


FEED = {"input_ids": np.ones((1, 4), dtype=np.int64)}


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr("compressor.bench.time.perf_counter", fake)
    return fake


def test_a_clear_verdict_is_not_remeasured(clock):
    bench = BenchmarkConfig(warmup=1, iterations=20, max_remeasure_seconds=5)
    base, cand = ClockRunner("base", clock, 4.0, seed=1), ClockRunner("cand", clock, 1.0, seed=2)
    timings, estimates, extra = measure([base, cand], FEED, bench, {"cand": [1.2]})
    assert extra == 0.0 and len(timings.calls["cand"]) == 20
    estimate = estimates["cand"]
    assert not estimate.marginal and estimate.interval[0] > 1.2 and estimate.rounds == 2


def test_a_close_call_is_remeasured_until_it_is_decided(clock):
    # True speed-up 1.02 against a threshold of 1.0: 20 noisy pairs cannot tell, more can.
    bench = BenchmarkConfig(warmup=1, iterations=20, max_remeasure_seconds=60)
    base = ClockRunner("base", clock, 1.02, jitter=0.1, seed=1)
    cand = ClockRunner("cand", clock, 1.0, jitter=0.1, seed=2)
    short = measure([base, cand], FEED, BenchmarkConfig(warmup=1, iterations=20, max_remeasure_seconds=0),
                    {"cand": [1.0]})[1]["cand"]
    assert short.marginal
    timings, estimates, extra = measure([base, cand], FEED, bench, {"cand": [1.0]})
    assert 0 < extra < 60 and len(timings.calls["cand"]) > 20
    assert not estimates["cand"].marginal and estimates["cand"].interval[0] > 1.0


def test_a_close_call_is_remeasured_up_to_the_budget_then_marked_marginal(clock):
    # Two runners that take the same time: a threshold of 1.0 stays inside the interval however long
    # they are timed, so measuring goes on until the budget is spent, and no longer.
    bench = BenchmarkConfig(warmup=1, iterations=20, max_remeasure_seconds=2.0)
    base, cand = ClockRunner("base", clock, 1.0, seed=1), ClockRunner("cand", clock, 1.0, seed=2)
    timings, estimates, extra = measure([base, cand], FEED, bench, {"cand": [1.0]})
    round_trip = (20 + 4) * 2 / 1000  # one re-measuring step: 20 timed and 4 settling calls per runner
    assert 2.0 <= extra < 2.0 + round_trip
    assert len(timings.calls["cand"]) > 20 and len(timings.calls["base"]) == len(timings.calls["cand"])
    assert estimates["cand"].marginal and estimates["cand"].straddles(1.0)


def test_a_zero_budget_never_remeasures(clock):
    bench = BenchmarkConfig(warmup=0, iterations=10, max_remeasure_seconds=0)
    base, cand = ClockRunner("base", clock, 1.0, seed=1), ClockRunner("cand", clock, 1.0, seed=2)
    timings, estimates, extra = measure([base, cand], FEED, bench, {"cand": [1.0]})
    assert extra == 0.0 and len(timings.calls["cand"]) == 10 and estimates["cand"].marginal


def _sides(base_p50, result_p50, interval):
    return (baseline_side(p50=base_p50, size=1.0),
            result_side(p50=result_p50, size=1.0, estimate=speedup(base_p50 / result_p50, interval)))


def test_gate_attaches_the_interval_and_marks_a_threshold_inside_it():
    goals = Goals(latency={"min_speedup": 2.0})
    clear = check_goals(goals, *_sides(10.0, 4.0, [2.3, 2.7]))[0]
    assert clear.passed and not clear.marginal and clear.interval == (2.3, 2.7)
    close = check_goals(goals, *_sides(10.0, 4.9, [1.9, 2.2]))[0]
    assert close.passed and close.marginal
    assert not check_goals(goals, *_sides(10.0, 5.3, [1.85, 1.99]))[0].marginal


def test_regression_goal_maps_the_interval_into_a_slow_down():
    previous = report([], base=baseline_side(p50=10.0), result=result_side(p50=5.0))
    regression = RegressionGoals(max_latency_increase=0.10)
    base, result = _sides(10.0, 5.5, [1.7, 1.9])  # speed-up 1.82 against 2.0 before
    verdict = check_regression(regression, "text-classification", previous, base, result, [])[0]
    assert verdict.interval == pytest.approx((2 / 1.9 - 1, 2 / 1.7 - 1))
    assert verdict.marginal  # 0.10 lies inside [0.053, 0.176]
    goals = Goals(latency={"min_speedup": 1.5}, regression={"max_latency_increase": 0.10})
    assert speedup_thresholds(goals, previous) == pytest.approx([1.5, 2.0 / 1.1])
    assert speedup_thresholds(goals, None) == [1.5]


def test_regression_against_another_machine_is_not_judged_but_accuracy_is():
    previous = report([], base=baseline_side(p50=10.0), result=result_side({"accuracy": 0.9}, p50=2.0))
    regression = RegressionGoals(max_latency_increase=0.10, max_accuracy_drop=0.01)
    base, result = baseline_side(p50=10.0), result_side({"accuracy": 0.85}, p50=5.0,
                                                        estimate=speedup(2.0, [1.9, 2.1]))
    differences = ["CPU extensions: avx2 avx512_vnni then, avx2 now"]
    latency_verdict, accuracy_verdict = check_regression(regression, "text-classification", previous, base, result,
                                                         differences)
    assert latency_verdict.measured == pytest.approx(1.5)  # 5x then, 2x now: far past 10%, yet
    assert latency_verdict.passed and not latency_verdict.judged and "another machine" in latency_verdict.note
    assert not accuracy_verdict.passed and accuracy_verdict.judged  # accuracy does not depend on the machine
    goals = Goals(regression={"max_latency_increase": 0.10})
    assert speedup_thresholds(goals, previous, same_machine=False) == []
    written = report([latency_verdict, accuracy_verdict])
    assert "not judged" in markdown(written) and 'skipped="1"' in junit(written)


def test_machine_differences_name_what_moves_speed_ups():
    env = environment(2).model_copy(update={"cpu_model": "EPYC", "isa_flags": ["avx2", "avx512_vnni"]})
    stored = report([], environment=env)
    assert machine_differences(stored, env) == []
    other = env.model_copy(update={"isa_flags": ["avx2"], "threads": 4})
    assert machine_differences(stored, other) == ["CPU extensions: avx2 avx512_vnni then, avx2 now",
                                                  "threads: 2 then, 4 now"]


def test_a_report_without_machine_facts_compares_only_what_it_recorded():
    # Written before schema 2: no CPU model, ISA flags or threads in environment; threads are in benchmark.
    old = environment(None).model_copy(update={"cpu_model": "unknown", "isa_flags": []})
    stored = report([], environment=old)
    now = environment(2).model_copy(update={"cpu_model": "EPYC", "isa_flags": ["avx2"]})
    assert stored.benchmark.threads == 2 and machine_differences(stored, now) == []


def test_report_and_junit_say_marginal():
    goal = GateRow(goal="latency.min_speedup", threshold=2.0, measured=2.05, passed=True, margin=0.05, unit="x",
                   interval=(1.9, 2.2), marginal=True)
    written = report([goal], result=result_side(p50=1.0, estimate=speedup(2.05, [1.9, 2.2], rounds=8)))
    written.benchmark.remeasured_seconds = 12.0
    text = markdown(written)
    assert "2.05x [1.9, 2.2]" in text and "pass (marginal)" in text and "8 interleaved rounds" in text
    assert "12 s of it re-measuring" in text
    failed = written.model_copy(update={"gate": [goal.model_copy(update={"passed": False})]})
    assert "marginal" in junit(failed)
