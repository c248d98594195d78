"""How often the latency gate gives the right verdict, on the demo recipe (sentiment classifier,
ONNX int8 dynamic against torch fp32).

1. The true speed-up S is measured once with many interleaved calls (`--reference-calls`).
2. The gate is checked `--trials` times with `latency.min_speedup` = 0.9 S, exactly as `compress run`
   checks it (the recipe's benchmark settings, bootstrap interval, re-measuring up to the recipe's
   budget). Right verdict: pass.
3. The gate is checked `--trials` times against the same artifact made 25% slower (every call is
   followed by a sleep of a quarter of its own duration, so latency x 1.25 and speed-up 0.8 S),
   with the same 0.9 S threshold. Right verdict: fail.
4. For illustration, not scored: `--at-threshold-trials` gates with the threshold at S itself, where
   no verdict is right; these show the re-measuring and the marginal flag.
5. S is measured again at the end, to show how far the machine drifted meanwhile.

Target: 10/10 and 10/10. Prints every trial (speed-up, interval, re-measuring seconds, marginal).

Usage: python benchmarks/gate_stability.py [--trials 10] [--reference-calls 600]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-sentiment-int8-dynamic.yaml"
SLOWDOWN = 0.25


class Slowed:
    """A runner whose every call takes (1 + fraction) times as long: the call, then a sleep."""

    def __init__(self, runner, fraction: float):
        self.runner, self.fraction = runner, fraction
        self.name, self.backend = runner.name, runner.backend

    def __call__(self, feed):
        started = time.perf_counter()
        output = self.runner(feed)
        time.sleep((time.perf_counter() - started) * self.fraction)
        return output


def reference_speedup(runners, feed, calls: int) -> float:
    from compressor.bench import Timings, warm_up

    timings = Timings([r.name for r in runners], batch=1)
    warm_up(runners, feed, 20)
    timings.extend(runners, feed, calls)
    return timings.speedup(runners[0].name, runners[1].name)


def gate_once(runners, feed, bench, threshold: float) -> dict:
    """The latency gate as `compress run` applies it: measure, then check_goals on the result."""
    from compressor.bench import measure
    from compressor.gate import check_goals
    from compressor.recipe import Goals
    from compressor.report_schema import BaselineSide, ResultSide, Speedup

    timings, estimates, extra = measure(runners, feed, bench, {runners[1].name: [threshold]})
    base, cand = (timings.latency(r.name).as_dict() for r in runners)
    estimate = estimates[runners[1].name]
    verdict = check_goals(Goals(latency={"min_speedup": threshold}),
                          BaselineSide(model="checkpoint", metrics={}, latency_ms=base, size_mb=1, backend="torch"),
                          ResultSide(metrics={}, latency_ms=cand, size_mb=1, backend="onnx", artifact="-",
                                     speedup=Speedup(**estimate.as_dict())))[0]
    return {"passed": verdict.passed, "speedup": estimate.speedup, "interval": estimate.interval,
            "marginal": verdict.marginal, "remeasured": extra, "rounds": estimate.rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--reference-calls", type=int, default=600)
    parser.add_argument("--at-threshold-trials", type=int, default=3)
    args = parser.parse_args()

    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.pipeline import RunOptions, run_stages
    from compressor.planning import plan
    from compressor.recipe import load_recipe
    from compressor.runners import make_runner

    recipe = load_recipe(RECIPE)
    bench = recipe.benchmark
    checkpoint = fixtures.ensure("sentiment-classifier")
    with tempfile.TemporaryDirectory() as tmp:
        source = TorchModel(checkpoint, recipe.task)
        artifact, _ = run_stages(recipe, plan(recipe), source, Path(tmp) / "work",
                                 RunOptions(out=Path(tmp) / "out", cache=False))
        base = make_runner(source, "baseline", threads=bench.threads)
        result = make_runner(artifact, "result", threads=bench.threads)
        samples = load_samples(recipe.evaluation.data, recipe.task)
        feed = benchmark_feed(load_tokenizer(checkpoint), samples.texts, bench.batch_size, bench.seq_len)

        true_speedup = reference_speedup([base, result], feed, args.reference_calls)
        threshold = 0.9 * true_speedup
        print(f"{recipe.name}: true speed-up {true_speedup:.3f}x ({args.reference_calls} interleaved calls each); "
              f"threshold 0.9 x = {threshold:.3f}x; recipe benchmark: {bench.iterations} calls, "
              f"{bench.confidence:.0%} interval, up to {bench.max_remeasure_seconds:.0f} s re-measuring")
        right = {}
        cases = [("as built", [base, result], threshold, True, args.trials),
                 (f"{SLOWDOWN:.0%} slower", [base, Slowed(result, SLOWDOWN)], threshold, False, args.trials),
                 ("threshold at the true speed-up", [base, result], true_speedup, None, args.at_threshold_trials)]
        for label, runners, bar, expected, trials in cases:
            print(f"\n{label}, min_speedup {bar:.3f}x (right verdict: "
                  f"{'none, not scored' if expected is None else 'pass' if expected else 'fail'})")
            print("trial  verdict  speed-up  interval          rounds  re-measured  marginal")
            for trial in range(trials):
                outcome = gate_once(runners, feed, bench, bar)
                if expected is not None:
                    right[label] = right.get(label, 0) + (outcome["passed"] == expected)
                low, high = outcome["interval"]
                print(f"{trial + 1:>5}  {'pass' if outcome['passed'] else 'fail':>7}  {outcome['speedup']:>7.3f}x  "
                      f"[{low:.3f}, {high:.3f}]  {outcome['rounds']:>6}  {outcome['remeasured']:>9.1f} s  "
                      f"{'yes' if outcome['marginal'] else 'no':>8}")
        after = reference_speedup([base, result], feed, args.reference_calls)
        print(f"\ntrue speed-up measured again at the end: {after:.3f}x ({after / true_speedup - 1:+.1%})")
        for label, count in right.items():
            print(f"right verdicts, {label}: {count}/{args.trials}")


if __name__ == "__main__":
    main()
