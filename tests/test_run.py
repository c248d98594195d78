"""compress run end to end on tiny models: run folder contents, atomicity, and the CLI's exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.artifacts import sha256_file
from compressor.pipeline import RunOptions, run
from compressor.recipe import load_recipe

from .conftest import TINY_EVALUATION, write_recipe

CLASSIFIER_RECIPE = """
name: tiny-cls
task: text-classification
stages:
  - type: export_onnx
  - type: optimize_onnx
  - type: quantize
    scheme: int8-dynamic
evaluation:
  data: {{path: "{data}"}}
  batch_size: 8
benchmark: {{seq_len: 32, iterations: 6, warmup: 1, memory: false}}
goals:
  accuracy:
    - {{metric: agreement, min: {agreement}}}
  size: {{max_ratio: 0.9}}
"""


def classifier_recipe(tmp_path, data, agreement=0.0):
    return write_recipe(tmp_path, CLASSIFIER_RECIPE.format(data=data, agreement=agreement))


def test_run_writes_complete_run_folder(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = load_recipe(classifier_recipe(tmp_path, sentences_jsonl))
    result = run(recipe, tiny_classifier, RunOptions(out=tmp_path / "out"))
    out = result.out
    # Every entry, hidden ones and folders included: the ONNX model with no external-data file (the tiny
    # model fits in one protobuf), the checkpoint's config and tokenizer files beside it (no torch weights),
    # and the four reports; a leftover work folder or a stray file would change the listing.
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "junit.xml", "manifest.json", "model.onnx", "report.json", "report.md",
        "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in out.iterdir())
    assert not (out / "work").exists() and not list(tmp_path.glob(".out.partial-*"))
    report = json.loads((out / "report.json").read_text())
    for key in ("recipe", "model", "verdict", "baseline", "result", "gate", "stages", "environment"):
        assert key in report
    assert report["verdict"] == "pass" and result.passed
    assert set(report["baseline"]["latency_ms"]) >= {"p50", "p90", "p99"}
    assert report["result"]["backend"] == "onnxruntime-cpu" and report["result"]["size_mb"] < report["baseline"]["size_mb"]
    assert [s["type"] for s in report["stages"]] == ["export_onnx", "optimize_onnx", "quantize"]
    assert report["evaluation"]["samples"] == 48
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"]["model.onnx"] == sha256_file(out / "model.onnx")
    assert manifest["packages"]["onnxruntime"] and manifest["checkpoint"]["digest"]
    suite = ET.parse(out / "junit.xml").getroot()
    assert [c.get("name") for c in suite.iter("testcase")] == ["accuracy.agreement.min", "size.max_ratio"]
    # The shipped artifact loads with ONNX Runtime on its own and agrees with what was evaluated.
    import onnxruntime as ort

    assert ort.InferenceSession(str(out / "model.onnx")).get_outputs()[0].name == "logits"


def test_peak_memory_is_measured_per_side_and_gated(tiny_classifier, sentences_jsonl, tmp_path):
    """Each side's peak memory comes from its own child process: the baseline's (torch) and the
    result's (ONNX Runtime) differ, both exceed their runtime's own memory, and memory.max_ratio
    gates on their ratio."""
    from compressor.report import markdown
    from compressor.report_schema import Report

    text = CLASSIFIER_RECIPE.format(data=sentences_jsonl, agreement=0.0).replace("memory: false", "memory: true")
    text = text.replace("  size: {max_ratio: 0.9}", "  size: {max_ratio: 0.9}\n  memory: {max_ratio: 0.01}")
    result = run(load_recipe(write_recipe(tmp_path, text)), tiny_classifier, RunOptions(out=tmp_path / "out"))
    report = result.json
    base, res = report["baseline"]["memory"], report["result"]["memory"]
    assert base["peak_rss_mb"] > base["runtime_rss_mb"] > 50 and res["peak_rss_mb"] > res["runtime_rss_mb"] > 20
    assert res["runtime_rss_mb"] < base["runtime_rss_mb"]  # ONNX Runtime alone is lighter than torch + transformers
    gate = {g["goal"]: g for g in report["gate"]}
    assert gate["memory.max_ratio"]["measured"] == pytest.approx(res["peak_rss_mb"] / base["peak_rss_mb"])
    assert not gate["memory.max_ratio"]["passed"] and not result.passed  # no model fits in 1% of the baseline
    assert "| peak memory (MB) |" in markdown(Report.model_validate(report))
    outcome = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.yaml"), "--model", str(tiny_classifier),
                                        "--out", str(tmp_path / "again"), "--no-memory"])
    assert outcome.exit_code == 2 and "goals.memory needs peak memory, which --no-memory turns off" in outcome.output


def test_failed_gate_is_reported(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = load_recipe(classifier_recipe(tmp_path, sentences_jsonl, agreement=1.01))
    result = run(recipe, tiny_classifier, RunOptions(out=tmp_path / "out"))
    assert not result.passed
    report = json.loads((result.out / "report.json").read_text())
    failed = [g for g in report["gate"] if not g["passed"]]
    assert report["verdict"] == "fail" and [g["goal"] for g in failed] == ["accuracy.agreement.min"]
    assert failed[0]["margin"] < 0
    suite = ET.parse(result.out / "junit.xml").getroot()
    assert suite.get("failures") == "1" and len(list(suite.iter("failure"))) == 1


def test_torch_only_recipe_and_generation_metrics(tiny_llama, text_file, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"""
        name: tiny-llm
        task: text-generation
        stages:
          - type: quantize
            scheme: int8-dynamic
        evaluation:
          data: {{path: "{text_file}"}}
          max_length: 32
          max_samples: 6
          batch_size: 2
        benchmark: {{seq_len: 32, iterations: 4, warmup: 1, memory: false}}
        goals:
          accuracy:
            - {{metric: perplexity, max_drop_pct: 50}}
            - {{metric: top1_agreement, min: 0.0}}
        """))
    result = run(recipe, tiny_llama, RunOptions(out=tmp_path / "out"))
    metrics = result.json["result"]["metrics"]
    base = result.json["baseline"]["metrics"]
    assert base["perplexity"] > 1 and base["top1_agreement"] == 1.0
    assert 0 < metrics["top1_agreement"] <= 1 and metrics["perplexity"] > 1
    assert result.json["evaluation"]["samples"] == 6
    assert result.json["gate"][0]["goal"] == "evaluation.consistent"  # every language model's run
    assert (result.out / "model" / "compress_transforms.json").exists()


def test_stage_failure_leaves_nothing(tiny_classifier, sentences_jsonl, tmp_path):
    from compressor.errors import StageFailed

    text = classifier_recipe(tmp_path, sentences_jsonl).read_text().replace("  - type: export_onnx",
                                                                            "  - type: export_onnx\n    atol: 1.0e-12")
    recipe = load_recipe(write_recipe(tmp_path, text, "strict.yaml"))
    with pytest.raises(StageFailed):
        run(recipe, tiny_classifier, RunOptions(out=tmp_path / "out"))
    assert list(tmp_path.glob("*out*")) == []


def test_refuses_to_overwrite_foreign_folder(tiny_classifier, sentences_jsonl, tmp_path):
    from compressor.errors import UserError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    recipe = load_recipe(classifier_recipe(tmp_path, sentences_jsonl))
    with pytest.raises(UserError, match="not a compress run folder"):
        run(recipe, tiny_classifier, RunOptions(out=tmp_path / "out"))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_killed_run_leaves_no_finished_looking_folder(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = classifier_recipe(tmp_path, sentences_jsonl)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "compressor", "run", str(recipe), "--model",
                                str(tiny_classifier), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".killed.partial-*/work/00-export_onnx")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.partial-*"))
    assert leftovers and not (leftovers[0] / "report.json").exists()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_exit_codes(tiny_classifier, sentences_jsonl, tmp_path):
    good = classifier_recipe(tmp_path, sentences_jsonl)
    passed = invoke("run", good, "--model", tiny_classifier, "--out", tmp_path / "a")
    assert passed.exit_code == 0, passed.output
    assert "verdict: PASS" in passed.output and "accuracy.agreement.min" in passed.output
    failing = classifier_recipe(tmp_path, sentences_jsonl, agreement=1.01)
    assert invoke("run", failing, "--model", tiny_classifier, "--out", tmp_path / "b").exit_code == 1
    missing = invoke("run", good, "--model", tmp_path / "nope", "--out", tmp_path / "c")
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output and "Traceback" not in missing.output
    from compressor.doctor import cuda_problem

    if cuda_problem():  # no GPU here: --device cuda stops before any stage, saying why
        cuda = invoke("run", good, "--model", tiny_classifier, "--device", "cuda")
        assert cuda.exit_code == 3 and "--device cuda:" in cuda.output and "Traceback" not in cuda.output
    typo = write_recipe(tmp_path, good.read_text().replace("batch_size: 8", "batch_sise: 8"), "typo.yaml")
    bad = invoke("run", typo, "--model", tiny_classifier)
    assert bad.exit_code == 2 and "typo.yaml:10: evaluation.batch_sise: unknown field" in bad.output
    assert "Traceback" not in bad.output


def test_cli_validate_and_stages(tmp_path):
    shipped = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))
    result = invoke("validate", *shipped)
    assert result.exit_code == 0 and result.output.count("ok ") == len(shipped)
    broken = write_recipe(tmp_path, "name: x\ntask: text-classification\nstages:\n  - type: optimize_onnx\n"
                                    "evaluation: {data: {dataset: sentiment-test}}\ngoals: {size: {max_ratio: 1}}\n")
    result = invoke("validate", broken)
    assert result.exit_code == 2 and "recipe.yaml:4: stages[0] (optimize_onnx)" in result.output
    listing = invoke("stages")
    assert listing.exit_code == 0
    for name in ("export_onnx", "optimize_onnx", "quantize", "per_channel", "atol", "static_axes"):
        assert name in listing.output


def test_cli_json_output_is_the_report(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = classifier_recipe(tmp_path, sentences_jsonl)
    result = invoke("run", recipe, "--model", tiny_classifier, "--out", tmp_path / "j", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads((tmp_path / "j" / "report.json").read_text())


STATIC_RECIPE = """
name: tiny-static
task: text-classification
stages:
  - type: export_onnx
  - type: quantize
    scheme: int8-static
    calibration:
      data: {{path: "{calibration}"}}
      samples: 16
      batch_size: 4
""" + TINY_EVALUATION + """goals:
  accuracy:
    - {{metric: agreement, min: 0.9}}
"""


def test_static_recipe_end_to_end(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = write_recipe(tmp_path, STATIC_RECIPE.format(calibration=sentences_jsonl, data=sentences_jsonl))
    result = run(load_recipe(recipe), tiny_classifier, RunOptions(out=tmp_path / "out"))
    assert result.passed, result.json["gate"]
    quantize = result.json["stages"][1]
    assert quantize["format"] == "QDQ" and quantize["calibration_samples"] == 16
    assert quantize["quantized_nodes"]["MatMul"] > 0


def test_missing_calibration_data_stops_before_any_stage(tiny_classifier, sentences_jsonl, tmp_path, monkeypatch):
    from compressor.stages.export.export_onnx import ExportOnnx

    exported = []
    monkeypatch.setattr(ExportOnnx, "run", lambda self, *args: exported.append(args))
    recipe = write_recipe(tmp_path, STATIC_RECIPE.format(calibration=tmp_path / "nope.jsonl", data=sentences_jsonl))
    outcome = invoke("run", recipe, "--model", tiny_classifier, "--out", tmp_path / "out")
    assert outcome.exit_code == 2
    assert f"{recipe}:8: stages[1].calibration.data.path: {tmp_path / 'nope.jsonl'}: data file not found" \
        in outcome.output
    assert exported == []  # nothing was exported first
    assert not (tmp_path / "out").exists()


REGRESSION_GOALS = """  regression:
    max_latency_increase: {latency}
    max_accuracy_drop: {drop}
"""


def regression_recipe(tmp_path, data, latency=3.0, drop=0.02, name="recipe.yaml"):
    text = CLASSIFIER_RECIPE.format(data=data, agreement=0.0) + REGRESSION_GOALS.format(latency=latency, drop=drop)
    return write_recipe(tmp_path, text, name)


def test_against_adds_regression_goals_to_the_gate_and_junit(tiny_classifier, sentences_jsonl, tmp_path):
    first = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl)), tiny_classifier,
                RunOptions(out=tmp_path / "first"))
    assert "goals.regression was not checked" in " ".join(first.json["notes"])
    assert not any(g.goal.startswith("regression.") for g in first.gate)
    previous = tmp_path / "first" / "report.json"
    second = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl)), tiny_classifier,
                 RunOptions(out=tmp_path / "second", against=previous))
    regression = {g.goal: g for g in second.gate if g.goal.startswith("regression.")}
    assert set(regression) == {"regression.latency_increase", "regression.accuracy.drop"}
    # The same artifact again: accuracy identical; the speed-up of a tiny model timed 6 times may move a
    # lot, so the latency threshold here is generous (3.0 = up to 4x slower).
    assert regression["regression.accuracy.drop"].measured == 0 and second.passed, second.json["gate"]
    assert second.json["against"]["report"] == str(previous)
    cases = {c.get("name") for c in ET.parse(tmp_path / "second" / "junit.xml").getroot()}
    assert {"regression.latency_increase", "regression.accuracy.drop"} <= cases


def test_against_a_better_stored_result_fails_on_regression(tiny_classifier, sentences_jsonl, tmp_path):
    first = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl)), tiny_classifier,
                RunOptions(out=tmp_path / "first"))
    better = dict(first.json)
    better["result"] = {**first.json["result"], "metrics": {**first.json["result"]["metrics"],
                                                              "accuracy": first.json["result"]["metrics"]["accuracy"]
                                                              + 0.1},
                        "latency_ms": {**first.json["result"]["latency_ms"],
                                       "p50": first.json["result"]["latency_ms"]["p50"] / 10}}
    stored = tmp_path / "better.json"
    stored.write_text(json.dumps(better))
    strict = regression_recipe(tmp_path, sentences_jsonl, latency=0.5, name="strict.yaml")
    outcome = CliRunner().invoke(main, ["run", str(strict), "--model", str(tiny_classifier),
                                        "--out", str(tmp_path / "again"), "--against", str(stored)])
    assert outcome.exit_code == 1, outcome.output
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    failed = {g["goal"] for g in report["gate"] if not g["passed"]}
    assert failed == {"regression.latency_increase", "regression.accuracy.drop"}
    drop = next(g for g in report["gate"] if g["goal"] == "regression.accuracy.drop")
    assert drop["measured"] == pytest.approx(0.1, abs=1e-9)


def test_against_needs_regression_goals_and_a_real_report(tiny_classifier, sentences_jsonl, tmp_path):
    plain = classifier_recipe(tmp_path, sentences_jsonl)
    args = ["--model", str(tiny_classifier), "--out", str(tmp_path / "out")]
    outcome = CliRunner().invoke(main, ["run", str(plain), *args, "--against", str(tmp_path / "x.json")])
    assert outcome.exit_code == 2 and "--against needs goals.regression" in outcome.output
    with_goals = regression_recipe(tmp_path, sentences_jsonl, name="r2.yaml")
    outcome = CliRunner().invoke(main, ["run", str(with_goals), *args, "--against", str(tmp_path / "x.json")])
    assert outcome.exit_code == 2 and "--against report not found" in outcome.output
    (tmp_path / "bad.json").write_text('{"task": "text-classification"}')
    outcome = CliRunner().invoke(main, ["run", str(with_goals), *args, "--against", str(tmp_path / "bad.json")])
    assert outcome.exit_code == 2 and "not a valid compress report.json" in outcome.output
    assert "baseline: Field required" in outcome.output  # the bad field is named
    assert not (tmp_path / "out").exists()


def test_against_a_report_from_another_machine_judges_accuracy_not_latency(tiny_classifier, sentences_jsonl,
                                                                           tmp_path):
    first = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl)), tiny_classifier,
                RunOptions(out=tmp_path / "first"))
    elsewhere = first.json
    elsewhere["environment"]["isa_flags"] = ["avx2", "fma"]
    elsewhere["environment"]["cpu_model"] = "Some Other CPU"
    # Ten times faster there: on the same machine this is a latency regression far past any threshold.
    elsewhere["result"]["latency_ms"]["p50"] /= 10
    elsewhere["result"]["metrics"]["accuracy"] += 0.1
    stored = tmp_path / "elsewhere.json"
    stored.write_text(json.dumps(elsewhere))
    strict = regression_recipe(tmp_path, sentences_jsonl, latency=0.5, name="strict.yaml")
    again = run(load_recipe(strict), tiny_classifier, RunOptions(out=tmp_path / "again", against=stored))
    verdicts = {g.goal: g for g in again.gate}
    latency = verdicts["regression.latency_increase"]
    assert not latency.judged and latency.passed and "Some Other CPU" in latency.note
    assert not verdicts["regression.accuracy.drop"].passed and not again.passed
    assert again.report.against.same_machine is False
    assert any("timed on another machine" in note for note in again.report.notes)


def test_validate_random_bytes_is_a_user_error_naming_the_file(tmp_path):
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(128, 256)) * 8)
    outcome = invoke("validate", junk)
    assert outcome.exit_code == 2, outcome.output
    assert str(junk) in outcome.output and "not UTF-8 text" in outcome.output
    assert "Traceback" not in outcome.output


def test_stages_prints_bracketed_option_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    outcome = invoke("stages")
    assert outcome.exit_code == 0, outcome.output
    # build_engine's profile: square brackets are text, not rich markup to be swallowed
    assert "default: min [1, 1], opt the benchmark's [batch_size, seq_len]" in outcome.output


def test_against_a_report_without_machine_facts_judges_latency_and_says_so(tiny_classifier, sentences_jsonl,
                                                                            tmp_path):
    first = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl)), tiny_classifier,
                RunOptions(out=tmp_path / "first"))
    older = first.json
    del older["schema_version"]
    for field in ("cpu_model", "isa_flags", "gpu", "threads", "device"):
        del older["environment"][field]
    stored = tmp_path / "older.json"
    stored.write_text(json.dumps(older))
    again = run(load_recipe(regression_recipe(tmp_path, sentences_jsonl, name="again.yaml")), tiny_classifier,
                RunOptions(out=tmp_path / "again", against=stored))
    latency = next(g for g in again.gate if g.goal == "regression.latency_increase")
    assert latency.judged and again.report.against.same_machine is None
    assert any("records no CPU model or ISA flags" in note for note in again.report.notes)
