"""The shipped GPU recipes: TensorRT fp16, int8 and fp8 engines of the sentiment classifier, the SmolLM2
AOTInductor bf16 package, and SmolLM2 SparseGPT 2:4 on sparse kernels. Everywhere: each is valid, and
`compress validate` says why it cannot run where it cannot. Where the GPU and backend are (marked gpu):
each runs end to end on its real model with --device cuda and is gated."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.aoti import aoti_problem
from compressor.cli import main
from compressor.cuda import cuda_problem
from compressor.engine import tensorrt_version
from compressor.pipeline import RunOptions, run
from compressor.recipe import load_recipe
from compressor.sparse_kernels import sparse_kernels_problem

from .conftest import real_fixture
from .test_shipped_recipes import shipped, shipped_param

RECIPES = Path(__file__).parent.parent / "recipes"
NO_TENSORRT = cuda_problem() or (None if tensorrt_version() else "the tensorrt package is not installed")
# recipe -> why it cannot run here (None where it can)
GPU_RECIPES = {"minilm-sentiment-trt-fp16.yaml": NO_TENSORRT, "minilm-sentiment-trt-int8.yaml": NO_TENSORRT,
               "minilm-sentiment-trt-fp8.yaml": NO_TENSORRT,
               "smollm2-aoti-bf16-gpu.yaml": aoti_problem("cuda"),
               "smollm2-sparsegpt-2-4-gpu.yaml": sparse_kernels_problem()}


def test_gpu_recipes_are_valid_everywhere_and_say_why_they_cannot_run_here():
    outcome = CliRunner().invoke(main, ["validate", *(str(RECIPES / name) for name in GPU_RECIPES)],
                                 terminal_width=300)
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.splitlines()
    for name, missing in GPU_RECIPES.items():
        [line] = [line for line in lines if name in line.split(":")[0]]
        assert line.startswith("ok ")
        if missing:
            assert "valid; cannot run on this machine" in line, line


def run_on_cuda(name: str, model: str, tmp_path):
    return run(load_recipe(RECIPES / name), real_fixture(model), RunOptions(out=tmp_path / "out", device="cuda",
                                                                          measure_memory=False))


def accuracy_goals(report: dict) -> dict[str, bool]:
    return {g["goal"]: g["passed"] for g in report["gate"] if g["goal"].startswith("accuracy.")}


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"TensorRT engines need a GPU and TensorRT: {NO_TENSORRT}")
@pytest.mark.parametrize("recipe, precision", [shipped_param("minilm-sentiment-trt-fp16.yaml", "fp16"),
                                               shipped_param("minilm-sentiment-trt-int8.yaml", "int8"),
                                               shipped_param("minilm-sentiment-trt-fp8.yaml", "fp8")])
def test_tensorrt_recipes_run_and_keep_accuracy(recipe, precision, tmp_path):
    report = run_on_cuda(recipe, "sentiment-classifier", tmp_path).json
    assert report["result"]["backend"] == f"tensorrt-{precision}"
    assert all(accuracy_goals(report).values()), report["gate"]


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(aoti_problem("cuda") is not None, reason=str(aoti_problem("cuda")))
@shipped("smollm2-aoti-bf16-gpu.yaml")
def test_smollm2_aoti_bf16_package_keeps_perplexity(tmp_path):
    result = run_on_cuda("smollm2-aoti-bf16-gpu.yaml", "smollm2", tmp_path)
    report = result.json
    assert report["result"]["backend"] == "aoti-cuda-bfloat16" and (result.out / "model.pt2").is_file()
    assert all(accuracy_goals(report).values()), report["gate"]


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(sparse_kernels_problem() is not None, reason=str(sparse_kernels_problem()))
@shipped("smollm2-sparsegpt-2-4-gpu.yaml")
def test_smollm2_sparsegpt_on_sparse_kernels(tmp_path):
    report = run_on_cuda("smollm2-sparsegpt-2-4-gpu.yaml", "smollm2", tmp_path).json
    sparsify = report["stages"][1]
    assert sparsify["sparse_layers"] == 30 * 7 and list(sparsify["dense_layers"]) == ["lm_head"]
    assert report["result"]["backend"].startswith("torch-cuda-float16-2:4-")
    assert all(accuracy_goals(report).values()), report["gate"]
