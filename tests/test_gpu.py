"""GPU paths: torch on CUDA (float32 / float16), bitsandbytes nf4 on CUDA, ONNX Runtime's CUDA provider,
and TensorRT engines built, stamped, reloaded and run through `compress run --device cuda`. Each test
skips, saying why, where its backend is absent."""

import importlib.util
import json

import numpy as np
import pytest

from compressor.doctor import cuda_problem, ort_provider_problem
from compressor.engine import tensorrt_version
from compressor.pipeline import RunOptions, run
from compressor.recipe import load_recipe

from .conftest import TINY_EVALUATION, write_recipe

NO_CUDA = cuda_problem()
needs_cuda = pytest.mark.skipif(NO_CUDA is not None, reason=f"no CUDA GPU: {NO_CUDA}")
needs_tensorrt = pytest.mark.skipif(NO_CUDA is not None or tensorrt_version() is None,
                                    reason=f"TensorRT needs a CUDA GPU and the tensorrt package "
                                           f"({NO_CUDA or 'tensorrt not installed'})")
pytestmark = pytest.mark.gpu


def _feed(length=32, batch=4):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 90, size=(batch, length)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@needs_cuda
def test_torch_cuda_runner_matches_the_cpu(tiny_classifier):
    from compressor.artifacts import TorchModel
    from compressor.runners import make_runner

    cpu = make_runner(TorchModel(tiny_classifier, "text-classification"), "cpu")
    cuda = make_runner(TorchModel(tiny_classifier, "text-classification"), "cuda", device="cuda")
    half = make_runner(TorchModel(tiny_classifier, "text-classification"), "half", device="cuda",
                       torch_dtype="float16")
    feed = _feed()
    reference = cpu(feed)
    assert cuda.backend == "torch-cuda-float32" and half.backend == "torch-cuda-float16"
    assert np.abs(cuda(feed) - reference).max() < 1e-4
    assert 0 < np.abs(half(feed) - reference).max() < 5e-2  # really ran in half precision, and close


CLASSIFIER = """
name: gpu-{name}
task: text-classification
stages:
{stages}
""" + TINY_EVALUATION + """
goals:
  accuracy:
    - {{metric: agreement, min: 0.9}}
"""


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_on_cuda_end_to_end(tiny_llama, text_file, tmp_path):
    recipe = write_recipe(tmp_path, f"""
        name: gpu-nf4
        task: text-generation
        stages:
          - type: quantize
            scheme: nf4
            compute_dtype: float16
        evaluation:
          data: {{path: "{text_file}"}}
          max_length: 32
          batch_size: 4
        benchmark: {{seq_len: 32, iterations: 10, warmup: 2}}
        goals:
          size: {{max_ratio: 0.9}}
        """)
    result = run(load_recipe(recipe), tiny_llama, RunOptions(out=tmp_path / "out", device="cuda"))
    assert result.json["result"]["backend"] == "torch-cuda-float32"
    assert result.json["result"]["metrics"]["perplexity"] < 2 * result.json["baseline"]["metrics"]["perplexity"]


@needs_cuda
@pytest.mark.skipif(ort_provider_problem("cuda") is not None, reason=str(ort_provider_problem("cuda")))
def test_onnx_runtime_cuda_provider_end_to_end(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = write_recipe(tmp_path, CLASSIFIER.format(name="ort", stages="  - type: export_onnx",
                                                      data=sentences_jsonl))
    result = run(load_recipe(recipe), tiny_classifier, RunOptions(out=tmp_path / "out", device="cuda"))
    assert result.json["result"]["backend"] == "onnxruntime-cuda" and result.passed


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_end_to_end(precision, tiny_classifier, sentences_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    stages = f"  - type: export_onnx\n  - type: build_engine\n    precision: {precision}"
    recipe = write_recipe(tmp_path, CLASSIFIER.format(name=precision, stages=stages, data=sentences_jsonl))
    result = run(load_recipe(recipe), tiny_classifier, RunOptions(out=tmp_path / "out", device="cuda"))
    assert result.json["result"]["backend"] == f"tensorrt-{precision}" and result.passed
    metadata = json.loads((result.out / "model.engine.json").read_text())
    assert metadata["tensorrt"] == tensorrt_version() and metadata["precision"] == precision
    assert (tmp_path / "cache" / "tensorrt-timing.cache").stat().st_size > 0
    # A second build reads the timing cache the first one wrote.
    again = run(load_recipe(recipe), tiny_classifier, RunOptions(out=tmp_path / "again", device="cuda"))
    assert json.loads((again.out / "model.engine.json").read_text())["timing_cache"]["reused_bytes"] > 0
