"""Generation speed: the torch and ONNX (with past key/values) generators decode the same greedy
tokens as transformers' own generate(), each side's figures reach the report, and goals on them
are checked; a recipe that cannot decode with a cache is refused when planning."""

import numpy as np
import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.generation import generate_tokens, generator_for, time_generation
from compressor.pipeline import RunOptions, run
from compressor.planning import plan
from compressor.recipe import load_recipe, parse_recipe
from compressor.runners import make_runner
from compressor.stages.export.export_onnx import ExportOnnxConfig

from .conftest import write_recipe
from .test_stages import run_stage

TASK = "text-generation"
PROMPT = np.array([[2, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]], dtype=np.int64)


@pytest.fixture(scope="module")
def exported_with_past(tiny_llama, tmp_path_factory):
    return run_stage(ExportOnnxConfig(type="export_onnx", with_past=True, atol=1e-3), TorchModel(tiny_llama, TASK),
                     tmp_path_factory.mktemp("past"), TASK)[0]


def test_torch_and_onnx_generators_decode_what_transformers_generates(tiny_llama, exported_with_past):
    module = load_torch_model(TorchModel(tiny_llama, TASK))
    with torch.no_grad():
        expected = module.generate(torch.from_numpy(PROMPT), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                                   pad_token_id=0)[0, PROMPT.shape[1]:].tolist()
    for artifact in (TorchModel(tiny_llama, TASK), exported_with_past):
        tokens, first_ms, steps = generate_tokens(generator_for(make_runner(artifact, "x", threads=2)), PROMPT, 10)
        assert tokens == expected, artifact
        assert first_ms > 0 and len(steps) == 9 and all(s > 0 for s in steps)


def test_time_generation_alternates_sides(tiny_llama, exported_with_past):
    runners = [make_runner(TorchModel(tiny_llama, TASK), "torch", threads=2),
               make_runner(exported_with_past, "onnx", threads=2)]
    times = time_generation(runners, PROMPT, new_tokens=5, rounds=3)
    for name in ("torch", "onnx"):
        summary = times[name].summary(PROMPT.shape[1], 5)
        assert summary["rounds"] == 3 and len(times[name].step_ms) == 3 * 4
        assert summary["tokens_per_s"] == pytest.approx(1000 / summary["decode_ms_per_token"], rel=5e-3)


GENERATE_RECIPE = """
name: tiny-generate
task: text-generation
stages:
  - type: export_onnx
    with_past: {with_past}
    atol: 1.0e-3
evaluation:
  data: {{path: "{data}"}}
  max_length: 32
  max_samples: 4
  batch_size: 2
benchmark:
  seq_len: 32
  iterations: 4
  warmup: 1
  memory: false
  generate: {{prompt_tokens: 16, new_tokens: 6, rounds: 2}}
goals:
  latency:
    min_decode_speedup: 0.01
    min_tokens_per_s: 1.0e+9
"""


def test_a_run_reports_generation_speed_and_gates_on_it(tiny_llama, text_file, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, GENERATE_RECIPE.format(with_past="true", data=text_file)))
    result = run(recipe, tiny_llama, RunOptions(out=tmp_path / "out", max_remeasure_seconds=0))
    base, res = result.json["baseline"]["generation"], result.json["result"]["generation"]
    assert base["prompt_tokens"] == 16 and base["new_tokens"] == 6 and res["rounds"] == 2
    gate = {g["goal"]: g for g in result.json["gate"]}
    assert gate["latency.min_decode_speedup"]["passed"]
    assert gate["latency.min_decode_speedup"]["measured"] == pytest.approx(
        base["decode_ms_per_token"] / res["decode_ms_per_token"])
    assert not gate["latency.min_tokens_per_s"]["passed"]  # no CPU decodes a billion tokens a second
    assert "| tokens/s (batch 1, 6 new) |" in (result.out / "report.md").read_text()


def test_generation_needs_a_cache_and_a_language_model(text_file, tmp_path):
    with pytest.raises(UserError, match=r"stages\[0\] \(export_onnx\): benchmark.generate decodes with the KV cache; "
                                        r"export with `with_past: true`"):
        plan(load_recipe(write_recipe(tmp_path, GENERATE_RECIPE.format(with_past="false", data=text_file))))
    text = GENERATE_RECIPE.format(with_past="true", data=text_file).replace("min_decode_speedup: 0.01\n", "")
    text = text.replace("  generate: {prompt_tokens: 16, new_tokens: 6, rounds: 2}\n", "")
    with pytest.raises(UserError, match="min_decode_speedup and min_tokens_per_s need benchmark.generate"):
        parse_recipe(text, "r.yaml")


def test_a_generation_longer_than_the_model_is_refused_before_running(tiny_llama, text_file, tmp_path):
    from compressor.pipeline import prepare

    text = GENERATE_RECIPE.format(with_past="true", data=text_file).replace("new_tokens: 6", "new_tokens: 250")
    with pytest.raises(UserError, match="16 prompt \\+ 250 new tokens exceed the model's 256 positions"):
        prepare([load_recipe(write_recipe(tmp_path, text))], tiny_llama, RunOptions(out=tmp_path / "out"))
