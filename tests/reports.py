"""Typed report parts for tests that exercise the gate and the report writers without running a model."""

from __future__ import annotations

from compressor.recipe import BenchmarkConfig
from compressor.report import environment
from compressor.report_schema import (BaselineSide, BenchmarkInfo, EvaluationInfo, GateRow, Report, ResultSide,
                                      Speedup)


def latency(p50: float = 10.0, p95: float | None = None) -> dict:
    p95 = p50 if p95 is None else p95
    return {"p50": p50, "p90": p95, "p95": p95, "p99": p95, "mean": p50, "throughput": 1000 / p50, "iterations": 10}


def speedup(value: float, interval, rounds: int = 8, marginal: bool = False) -> Speedup:
    return Speedup(speedup=value, interval=tuple(interval), confidence=0.95, rounds=rounds, marginal=marginal)


def baseline_side(metrics=None, p50=10.0, p95=None, size=100.0) -> BaselineSide:
    return BaselineSide(model="checkpoint", metrics=metrics or {}, latency_ms=latency(p50, p95), size_mb=size,
                        backend="torch-cpu")


def result_side(metrics=None, p50=10.0, p95=None, size=100.0, estimate=None) -> ResultSide:
    return ResultSide(metrics=metrics or {}, latency_ms=latency(p50, p95), size_mb=size, backend="onnxruntime-cpu",
                      artifact="model.onnx", speedup=estimate)


def report(gate: list[GateRow], base: BaselineSide | None = None, result: ResultSide | None = None,
           **fields) -> Report:
    base = base or baseline_side()
    result = result or result_side()
    values = dict(recipe="r", recipe_file="r.yaml", model="m", task="text-classification",
                  verdict="pass" if all(g.passed for g in gate) else "fail", baseline=base, result=result, gate=gate,
                  stages=[], evaluation=EvaluationInfo(samples=1, data="d", max_length=8),
                  benchmark=BenchmarkInfo(**BenchmarkConfig().model_dump()), environment=environment(2),
                  created="2026-01-01T00:00:00Z")
    values.update(fields)
    return Report(**values)
