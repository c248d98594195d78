"""sparsify: 2:4-pruned linear layers onto semi-structured sparse kernels. Here (no GPU): which layers qualify,
what planning refuses (exit 2) and the refusal to run without a GPU (exit 3, with the reason). Where a GPU
is (marked gpu): the kernels really run, through `compress run --device cuda`, and match the dense layers."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compressor import sparse_kernels
from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.cli import main
from compressor.errors import BackendMissing, UserError
from compressor.planning import plan
from compressor.recipe import load_recipe
from compressor.runners import make_runner
from compressor.sparsity import nm_mask

from .conftest import write_recipe

NO_KERNELS = sparse_kernels.sparse_kernels_problem()
RECIPE = """
name: tiny-sparse
task: text-generation
stages:
{stages}
evaluation:
  data: {{path: "{data}"}}
  max_length: 32
  batch_size: 4
benchmark: {{seq_len: 32, iterations: 6, warmup: 1, memory: false}}
goals:
  accuracy:
    - {{metric: perplexity, max_drop_pct: 1000}}  # magnitude 2:4 on random weights: the kernels are under test
    - {{metric: top1_agreement, min: 0.1}}
"""
PRUNE_2_4 = "  - type: prune\n    method: magnitude\n    pattern: \"2:4\"\n"
SPARSIFY = "  - type: sparsify\n    kernels: semi-structured\n    dtype: float16"


def sparse_recipe(tmp_path, data, stages=PRUNE_2_4 + SPARSIFY, name="recipe.yaml"):
    return write_recipe(tmp_path, RECIPE.format(stages=stages, data=data), name)


def pruned_2_4(folder):
    module = load_torch_model(TorchModel(folder, "text-generation"))
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                layer.weight[nm_mask(layer.weight.abs(), 2, 4)] = 0
    return module


def test_the_2_4_layers_with_kernel_shapes_are_chosen(tiny_llama, tiny_gpt2):
    from compressor.stages.prune.sparsify import kernel_layers

    module = pruned_2_4(tiny_llama)
    chosen, skipped, _ = kernel_layers(module, "auto")
    assert len(chosen) == 2 * 7 and all(name.startswith("model.layers.") for name in chosen)
    assert set(skipped) == {"lm_head"} and "not a multiple of [32, 64]" in skipped["lm_head"]  # 93 x 64
    # GPT-2's Conv1D layers have no kernel: named, and the model keeps them (the anatomy opens a view only)
    gpt2 = load_torch_model(TorchModel(tiny_gpt2, "text-generation"))
    chosen, skipped, parts = kernel_layers(gpt2, "auto")
    assert set(parts.conv1d) <= set(skipped) and len(parts.conv1d) == 2 * 4
    assert all("Conv1D" in skipped[name] for name in parts.conv1d) and "lm_head" not in chosen
    assert type(gpt2.get_submodule(parts.conv1d[0])).__name__ == "Conv1D"
    dense = torch.nn.Linear(64, 64)
    assert not sparse_kernels.is_2_4(dense.weight) and sparse_kernels.is_2_4(torch.zeros(32, 64))
    assert sparse_kernels.shape_problem((32, 48), "cutlass")
    assert not sparse_kernels.shape_problem((32, 48), "cusparselt")


@pytest.mark.skipif(NO_KERNELS is None, reason="this machine has 2:4 sparse kernels")
def test_without_a_gpu_the_recipe_is_valid_and_a_run_exits_3_with_the_reason(tiny_llama, text_file, tmp_path):
    recipe = sparse_recipe(tmp_path, text_file)
    with pytest.raises(BackendMissing, match=r"stages\[1\] \(sparsify\): 2:4 sparse kernels run on an NVIDIA GPU"):
        plan(load_recipe(recipe))
    validated = CliRunner().invoke(main, ["validate", str(recipe)], terminal_width=200)
    assert validated.exit_code == 0 and "valid; cannot run on this machine" in validated.output
    ran = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tiny_llama), "--out", str(tmp_path / "out")],
                             terminal_width=200)
    assert ran.exit_code == 3 and "2:4 sparse kernels run on an NVIDIA GPU only" in ran.output
    assert "Traceback" not in ran.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stages, match", [
    (SPARSIFY, r'need 2:4-sparse weights: add a `prune` stage with `pattern: "2:4"`'),
    (PRUNE_2_4.replace("2:4", "4:8") + SPARSIFY, r"writes the 4:8 pattern; semi-structured kernels take exactly 2:4"),
    ("  - type: prune\n    method: magnitude\n" + SPARSIFY, "writes the unstructured pattern"),
    (PRUNE_2_4 + "  - type: quantize\n    scheme: int8-weight-only\n" + SPARSIFY,
     r"stages\[1\] \(quantize\) comes first"),
    (PRUNE_2_4 + SPARSIFY + "\n  - type: export_onnx", "writes a serving format that no stage reads"),
])
def test_planning_refuses_weights_the_kernels_cannot_take(stages, match, text_file, tmp_path):
    with pytest.raises(UserError, match=match) as refused:
        plan(load_recipe(sparse_recipe(tmp_path, text_file, stages)))
    assert refused.value.exit_code == 2


def test_float32_is_refused_while_parsing_with_the_dtypes_the_kernels_take(text_file, tmp_path):
    recipe = sparse_recipe(tmp_path, text_file, PRUNE_2_4 + SPARSIFY.replace("float16", "float32"))
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: stages\[1\].*dtype.*'float16' or 'bfloat16'"):
        load_recipe(recipe)


def test_a_sparse_kernel_model_is_not_run_dense_on_the_cpu(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    pruned_2_4(tiny_llama).half().save_pretrained(folder)
    sparse_kernels.write_record(folder, {"kernels": "semi-structured", "dtype": "float16", "backend": "auto",
                                         "layers": ["model.layers.0.mlp.up_proj"]})
    with pytest.raises(UserError, match="2:4 sparse kernels, which need a GPU; run with --device cuda"):
        make_runner(TorchModel(folder, "text-generation"), "result")


@pytest.mark.gpu
@pytest.mark.skipif(NO_KERNELS is not None, reason=f"no 2:4 sparse kernels here: {NO_KERNELS}")
def test_semi_structured_linear_equals_the_dense_one_on_cuda():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128).half().cuda()
    with torch.no_grad():
        layer.weight[nm_mask(layer.weight.abs(), 2, 4)] = 0
    x = torch.randn(8, 33, 256, dtype=torch.float16, device="cuda")  # rows the kernels must pad
    dense = layer(x)
    kernel = sparse_kernels.to_semi_structured_(torch.nn.Sequential(layer), ["0"])
    assert type(layer.weight).__name__ == kernel and kernel.startswith("SparseSemiStructuredTensor")
    sparse = layer(x)
    assert torch.allclose(sparse, dense, rtol=1e-2, atol=1e-2), (sparse - dense).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(NO_KERNELS is not None, reason=f"no 2:4 sparse kernels here: {NO_KERNELS}")
def test_compress_run_on_cuda_converts_and_compares(tiny_llama, text_file, tmp_path):
    recipe = sparse_recipe(tmp_path, text_file)
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tiny_llama), "--device", "cuda",
                                        "--out", str(tmp_path / "out")])
    assert outcome.exit_code in (0, 1), outcome.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stage = report["stages"][1]
    assert stage["sparse_layers"] == 2 * 7 and stage["kernel"].startswith("SparseSemiStructuredTensor")
    assert stage["relative_diff"] <= stage["rtol"] and stage["max_abs_diff_sparse_vs_dense"] < 1e-2
    assert report["result"]["backend"].startswith("torch-cuda-float16-2:4-")
    assert np.isfinite(report["result"]["metrics"]["perplexity"])


def test_fused_experts_that_stay_dense_are_named_in_the_report(tmp_path):
    """The kernels take nn.Linear weights; an MoE model's fused expert tensors run dense, and the record's
    coverage and a note say so (the stage itself runs on CUDA only). The model keeps its fused layout."""
    from compressor.anatomy import is_fused_experts, record_coverage
    from compressor.stages import StageContext
    from compressor.stages.prune.sparsify import kernel_layers

    from .architectures import build_architecture

    moe = load_torch_model(TorchModel(build_architecture(tmp_path / "moe", "qwen3_moe"), "text-generation"))
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        for name, layer in moe.named_modules():  # 2:4 on every nn.Linear, the experts' fused tensors aside
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                layer.weight[nm_mask(layer.weight.abs(), 2, 4)] = 0
        before = moe(ids).logits
    ctx = StageContext(tmp_path, "text-generation", threads=2)
    chosen, skipped, parts = kernel_layers(moe, "cusparselt")
    assert chosen and not any(parts.expert_group_of(name) for name in chosen)
    record_coverage(parts, chosen, "sparsify", ctx)
    assert ctx.details["experts_changed_share"] == 0 and "experts not compressed" in ctx.notes[0]
    assert sum(is_fused_experts(child) for child in moe.modules()) == 2
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, before)
    dense = StageContext(tmp_path, "text-generation", threads=2)
    llama = pruned_2_4(build_architecture(tmp_path / "llama", "llama"))
    record_coverage(kernel_layers(llama, "cusparselt")[2], kernel_layers(llama, "cusparselt")[0], "sparsify", dense)
    assert not dense.notes and "experts_changed_share" not in dense.details
