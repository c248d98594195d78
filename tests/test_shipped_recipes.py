"""Every shipped recipe, run end to end on the real PyPI-shipped model it is written for.

Recipes written for the same model, evaluation and benchmark are run together by `compress compare`,
as a user comparing them would: the baseline is evaluated and timed once for the group, and every
stage output shared between recipes is reused from the stage cache. Accuracy and size verdicts are
asserted; latency verdicts are not, because they depend on the CPU (int8 is about fp32 speed on an
AVX2-only machine and 2-4x faster with VNNI or AMX): here latency must be measured and reported with
its interval, and `benchmarks/` checks latency promises side by side.
"""

import json
from pathlib import Path
from typing import Optional

import pytest

from compressor.compare import compare, load_recipes, read_recipe_list
from compressor.pipeline import RunOptions, run
from compressor.recipe import load_recipe

from .conftest import real_fixture

RECIPES = Path(__file__).parent.parent / "recipes"
pytestmark = pytest.mark.integration


def options(out: Path, memory: bool = False, benchmark_iterations: Optional[int] = None) -> RunOptions:
    # Resumed from the session's stage cache, as `compress run --resume` would. Close latency calls are
    # not re-measured: no latency verdict is asserted here, so that time would buy nothing. Peak memory
    # (a child process per side) is measured where a test asserts it. `benchmark_iterations`: fewer timed
    # calls for a group none of whose tests reads latency (the SmolLM2 group: 10 calls a side, not 30).
    return RunOptions(out=out, resume=True, max_remeasure_seconds=0, measure_memory=memory,
                      benchmark_iterations=benchmark_iterations)


def run_shipped(name: str, model: str, tmp_path):
    return run(load_recipe(RECIPES / name), real_fixture(model), options(tmp_path / "out"))


class ShippedGroup:
    """Shipped recipes of one listing run by `compress compare` against one baseline; only the recipes
    that the selected tests ask for (their `shipped` mark), so that running one test runs one recipe."""

    def __init__(self, listing: str, model: str, request, tmp_path_factory, memory: bool = False,
                 benchmark_iterations: Optional[int] = None):
        wanted = {name for item in request.session.items for mark in item.iter_markers("shipped")
                  for name in mark.args}
        paths = [p for p in read_recipe_list(RECIPES / listing) if p.name in wanted]
        self.recipes = [p.name for p in paths]
        self.out = tmp_path_factory.mktemp("compare") / "out"
        if len(paths) == 1:  # compare needs two; one recipe is a plain run into its own sub-folder
            run(load_recipe(paths[0]), real_fixture(model), options(self.out / paths[0].stem, memory,
                                                                    benchmark_iterations))
        elif paths:
            compare(load_recipes(paths), real_fixture(model), options(self.out, memory, benchmark_iterations))

    def report(self, recipe: str) -> dict:
        return json.loads((self.out / recipe.removesuffix(".yaml") / "report.json").read_text())

    def folder(self, recipe: str) -> Path:
        return self.out / recipe.removesuffix(".yaml")


def goals(report: dict) -> dict[str, bool]:
    """Verdict per goal, latency goals left out (they depend on the CPU), and the stages' coverage rows
    (coverage(report))."""
    return {g["goal"]: g["passed"] for g in report["gate"] if not g["goal"].startswith(("latency.", "coverage."))}


def coverage(report: dict) -> dict[str, float]:
    """Per weight-changing stage, the share of the block weights it targets that it changed."""
    return {g["goal"]: g["measured"] for g in report["gate"] if g["goal"].startswith("coverage.")}


def assert_latency_measured(report: dict, rounds: int = 3) -> None:
    """The latency goals were measured and reported with the speed-up's confidence interval."""
    speedup = report["result"]["speedup"]
    low, high = speedup["interval"]
    assert low <= speedup["speedup"] <= high and speedup["rounds"] >= rounds
    assert report["baseline"]["latency_ms"]["p50"] > 0 and report["result"]["latency_ms"]["p50"] > 0
    for goal in report["gate"]:
        if goal["goal"] == "latency.min_speedup":
            assert goal["interval"] and goal["measured"] == pytest.approx(speedup["speedup"], rel=1e-3)


def shipped(*recipes: str, every: bool = False):
    """Marks a test with the shipped recipes it reads. `every=True`: beyond the focused set `make test`
    runs (one recipe per kind of stage); `make test-recipes` runs every shipped recipe."""
    marks = [pytest.mark.shipped(*recipes)] + ([pytest.mark.every_recipe] if every else [])

    def mark(test):
        for m in marks:
            test = m(test)
        return test
    return mark


def shipped_param(recipe: str, *values, every: bool = False):
    return pytest.param(recipe, *values, marks=[pytest.mark.shipped(recipe)]
                        + ([pytest.mark.every_recipe] if every else []))


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory):
    """The SmolLM2 recipes the selected tests need, against one baseline (recipes/compare-smollm2.txt).
    Peak memory is not measured here (a child process per side): the test that asserts it runs alone."""
    return ShippedGroup("compare-smollm2.txt", "smollm2", request, tmp_path_factory, benchmark_iterations=10)


@pytest.fixture(scope="module")
def smollm2_tasks(request, tmp_path_factory):
    """The SmolLM2 recipes that also gate on generation fidelity and an lm-eval task
    (recipes/compare-smollm2-tasks.txt), against their own baseline."""
    return ShippedGroup("compare-smollm2-tasks.txt", "smollm2", request, tmp_path_factory, benchmark_iterations=10)


@pytest.fixture(scope="module")
def encoder(request, tmp_path_factory):
    return ShippedGroup("compare-minilm-encoder.txt", "minilm", request, tmp_path_factory)


def test_fixture_data_split_and_classifier():
    data = real_fixture("sentiment-data")
    train = (data / "train.jsonl").read_text().splitlines()
    test = (data / "test.jsonl").read_text().splitlines()
    assert (len(train), len(test)) == (8452, 2114)  # 10,566 distinct non-zero sentences, seeded 80/20
    assert not {json.loads(r)["text"] for r in train} & {json.loads(r)["text"] for r in test}
    record = json.loads((real_fixture("sentiment-classifier") / "fixture.json").read_text())
    assert record["test_accuracy"] > 0.8


@shipped("minilm-int8-dynamic.yaml", every=True)
def test_minilm_encoder_fails_only_on_worst_case_cosine(encoder):
    report = encoder.report("minilm-int8-dynamic")
    assert goals(report) == {"accuracy.cosine_mean.min": True, "accuracy.cosine_min.min": False,
                             "size.max_ratio": True}, report["gate"]
    # measured: mean 0.9915, worst 0.9761 (docs/BENCHMARKS.md); a broken model fails by far more
    metrics = report["result"]["metrics"]
    assert 0.985 < metrics["cosine_mean"] < 0.996 and 0.96 < metrics["cosine_min"] < 0.98
    assert_latency_measured(report)


@shipped("minilm-int8-static.yaml", every=True)
def test_minilm_encoder_int8_static_passes_its_accuracy_and_size_goals(encoder):
    report = encoder.report("minilm-int8-static")
    assert all(goals(report).values()), report["gate"]
    assert_latency_measured(report)
    metrics = report["result"]["metrics"]
    assert metrics["cosine_min"] > 0.98  # where int8-dynamic fails (0.976)
    quantize = report["stages"][1]
    assert quantize["method"] == "minmax" and quantize["quantized_nodes"]["MatMul"] == 48
    assert quantize["smoothed_activations"] == 24


@shipped("smollm2-int8-dynamic.yaml", every=True)
def test_smollm2_int8_dynamic_fails_on_perplexity(smollm2):
    report = smollm2.report("smollm2-int8-dynamic")
    verdicts = goals(report)
    assert report["verdict"] == "fail" and verdicts["accuracy.perplexity.max_drop_pct"] is False
    assert verdicts["size.max_ratio"] is True  # it does shrink; it just costs too much perplexity
    assert any("4-bit once" in note or "Q4_1" in note for note in report["notes"])
    # measured: 1.79-1.81x perplexity, top-1 agreement 0.556 (docs/BENCHMARKS.md): int8 loss, not a broken graph
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    assert 1.6 < ratio < 2.0 and 0.5 < report["result"]["metrics"]["top1_agreement"] < 0.62
    assert_latency_measured(report, rounds=1)  # the SmolLM2 group times 10 calls a side: one round


@shipped("smollm2-torch-int8-dynamic-fails.yaml", every=True)
def test_torch_int8_recipe_is_meant_to_fail(smollm2):
    report = smollm2.report("smollm2-torch-int8-dynamic-fails")
    verdicts = goals(report)
    assert report["verdict"] == "fail"
    assert verdicts["accuracy.perplexity.max_drop_pct"] is False and verdicts["accuracy.top1_agreement.min"] is False
    base, cand = report["baseline"]["metrics"], report["result"]["metrics"]
    # measured: 4.19x perplexity, top-1 agreement 0.366 (docs/BENCHMARKS.md): far worse, yet a language model
    assert 3.5 < cand["perplexity"] / base["perplexity"] < 5 and 0.3 < cand["top1_agreement"] < 0.45


@shipped("smollm2-int8-weight-only.yaml", every=True)
def test_smollm2_weight_only_passes_and_really_shrinks(smollm2):
    report = smollm2.report("smollm2-int8-weight-only")
    assert report["verdict"] == "pass", report["gate"]
    model = Path(report["result"]["artifact"])
    on_disk = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
    assert on_disk < 0.5 * report["baseline"]["size_mb"]
    assert abs(on_disk - report["result"]["size_mb"]) < 1


@shipped("smollm2-onnx-int8-weight-only.yaml", every=True)
def test_smollm2_onnx_weight_only_passes(smollm2):
    report = smollm2.report("smollm2-onnx-int8-weight-only")
    assert report["verdict"] == "pass", report["gate"]
    # every projection of the 30 layers; lm_head reads the embedding table it is tied to, which the
    # input Gather also reads, so it stays float (and is stored once)
    assert report["stages"][1]["quantized_weights"] == 30 * 7


@shipped("smollm2-int8-static-fails.yaml", every=True)
def test_smollm2_static_fails_naming_perplexity(smollm2):
    report = smollm2.report("smollm2-int8-static-fails")
    # +8.5% perplexity and 0.80 top-1 agreement: both of the recipe's accuracy goals catch it
    assert report["verdict"] == "fail" and [goal for goal, passed in goals(report).items() if not passed] == [
        "accuracy.perplexity.max_drop_pct", "accuracy.top1_agreement.min"]
    assert "FAIL" in (smollm2.folder("smollm2-int8-static-fails") / "report.md").read_text()
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    assert 1.05 < ratio < 1.13 and 0.76 < report["result"]["metrics"]["top1_agreement"] < 0.84  # 1.085x, 0.803


@pytest.mark.parametrize("recipe", [shipped_param("smollm2-wanda-50.yaml", every=True),
                                    shipped_param("smollm2-sparsegpt-2-4.yaml")])
def test_smollm2_half_sparse_recipes_hit_the_sparsity_but_fail_the_published_perplexity_bar(recipe, smollm2):
    report = smollm2.report(recipe)
    prune = report["stages"][0]
    assert prune["pruned_layers"] == 30 * 7
    assert all(abs(s - 0.5) < 0.002 for s in prune["sparsity_by_layer"].values())  # measured in the saved files
    assert report["verdict"] == "fail" and goals(report) == {
        "evaluation.consistent": True, "accuracy.perplexity.max_drop_pct": False, "accuracy.top1_agreement.min": False}
    assert coverage(report) == {"coverage.stages[0].prune": 1.0}
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    # far worse than the bar, far better than magnitude pruning (~15x / ~55x); llm-compressor on the
    # same tokens and evaluation: Wanda 2.238x, SparseGPT 2:4 3.412x (docs/BENCHMARKS.md)
    assert 1.5 < ratio < 5


@pytest.mark.parametrize("recipe, passes", [shipped_param("smollm2-onnx-int4-rtn.yaml", False, every=True),
                                            shipped_param("smollm2-onnx-int4-hqq.yaml", True, every=True)])
def test_smollm2_int4_recipes(recipe, passes, smollm2):
    report = smollm2.report(recipe)
    quantize = report["stages"][1]
    assert quantize["quantized_matmuls"] == 30 * 7 and quantize["float_weight_matmuls"] == 0
    assert goals(report)["size.max_ratio"] is True  # 4-bit blocks; the tied embedding table stays float
    assert (report["verdict"] == "pass") is passes and goals(report)["accuracy.perplexity.max_drop_pct"] is passes
    # measured (docs/BENCHMARKS.md): rtn 1.268x and top-1 agreement 0.681, hqq 1.000x and 0.992
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    agreement = report["result"]["metrics"]["top1_agreement"]
    low, high, agreement_low, agreement_high = (0.99, 1.02, 0.97, 1.0) if passes else (1.2, 1.35, 0.63, 0.73)
    assert low < ratio < high and agreement_low < agreement <= agreement_high


@shipped("smollm2-int4-gptq.yaml")
def test_smollm2_torch_gptq_meets_the_published_bar(smollm2_tasks):
    report = smollm2_tasks.report("smollm2-int4-gptq")
    quantize = report["stages"][0]
    # the tied embedding table (28M of the 135M parameters) is int8, and the head computes with its codes
    assert quantize["quantized_linear_layers"] == 30 * 7 and quantize["kept_in_float"] == []
    assert quantize["embeddings"] == "int8" and quantize["embedding_parameters"] == 49152 * 576
    assert quantize["act_order"] and quantize["calibration_samples"] == 16 and quantize["grid"] == "signed-max"
    assert all(goals(report).values()), report["gate"]
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    # 1.117x measured (docs/BENCHMARKS.md); llm-compressor's GPTQ on its absmax grid: 1.286x at best
    assert 1.08 < ratio < 1.125
    # scored by lm-eval and by greedy generation on both sides (measured: next-word accuracy 0.290 -> 0.297,
    # 12.1 of 30.9 generated tokens matching the baseline's from the start)
    base, result = report["baseline"], report["result"]
    assert 0.25 < base["metrics"]["compress_next_word/acc"] < 0.33 and result["metric_stderr"]["compress_next_word/acc"] > 0
    assert base["metrics"]["generation_exact_match"] == 1.0
    assert 6 < result["metrics"]["generation_prefix_tokens"] < base["metrics"]["generation_prefix_tokens"]


@shipped("smollm2-int4-gptq.yaml", every=True)
def test_smollm2_torch_gptq_holds_less_memory_than_fp32(tmp_path):
    # Peak memory, each side alone in a child process (the GPTQ stage comes from the session's stage cache
    # when the group above ran it): the fp32 model's 540 MB are in the baseline's peak; the packed int4
    # layers and the int8 table hold about a fifth of that.
    recipe = load_recipe(RECIPES / "smollm2-int4-gptq.yaml")
    report = run(recipe, real_fixture("smollm2"), options(tmp_path / "out", memory=True)).json
    base, result = report["baseline"]["memory"], report["result"]["memory"]
    assert base["peak_rss_mb"] - base["runtime_rss_mb"] > 540
    assert result["peak_rss_mb"] < base["peak_rss_mb"] - 150


@shipped("smollm2-int4-gptq.yaml", "smollm2-int4-gptq-vllm.yaml", every=True)
def test_smollm2_compressed_tensors_folder_is_the_gptq_model_as_transformers_reloads_it(smollm2_tasks):
    report = smollm2_tasks.report("smollm2-int4-gptq-vllm")
    quantize, export = report["stages"]
    assert export["format"] == "pack-quantized" and export["quantized_linear_layers"] == 210
    assert export["reload_max_abs_diff"] <= 1e-4
    assert all(goals(report).values()), report["gate"]
    # The same GPTQ model evaluated through transformers' compressed-tensors loader: the same figures.
    direct = smollm2_tasks.report("smollm2-int4-gptq")["result"]["metrics"]
    assert report["result"]["metrics"]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert report["result"]["metrics"]["top1_agreement"] == pytest.approx(direct["top1_agreement"], abs=1e-3)
    config = json.loads((Path(report["result"]["artifact"]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


@shipped("smollm2-fp8-dynamic.yaml", every=True)
def test_smollm2_fp8_dynamic_fails_its_near_lossless_goal_as_llm_compressor_does(smollm2_tasks):
    report = smollm2_tasks.report("smollm2-fp8-dynamic")
    quantize, export = report["stages"]
    assert quantize["quantized_linear_layers"] == 210 and quantize["format"] == "fp8"
    assert export["format"] == "float-quantized" and export["reload_max_abs_diff"] <= 1e-4
    verdicts = goals(report)
    assert report["verdict"] == "fail" and verdicts["size.max_ratio"] is True
    assert verdicts["accuracy.perplexity.max_drop_pct"] is False
    base, result = report["baseline"]["metrics"], report["result"]["metrics"]
    # measured: 1.041x perplexity, top-1 agreement 0.892; llm-compressor's FP8_DYNAMIC: the same codes and
    # the same 1.041x (docs/BENCHMARKS.md), so the loss is this 135M model's, not the tool's
    assert 1.03 < result["perplexity"] / base["perplexity"] < 1.05 and 0.87 < result["top1_agreement"] < 0.91


@shipped("smollm2-fp8-kv-cache.yaml", "smollm2-fp8-dynamic.yaml", every=True)
def test_smollm2_fp8_kv_cache_scales_every_layer_and_costs_what_was_measured(smollm2_tasks):
    report = smollm2_tasks.report("smollm2-fp8-kv-cache")
    quantize, export = report["stages"]
    kv = quantize["kv_cache"]
    assert kv["format"] == "fp8" and kv["attention_layers"] == 30 and kv["tokens_seen"] >= 16 * 255
    assert export["reload_max_abs_diff"] <= 1e-4 and export["kv_cache"].startswith("fp8")
    base, result = report["baseline"]["metrics"], report["result"]["metrics"]
    fp8_only = smollm2_tasks.report("smollm2-fp8-dynamic")["result"]["metrics"]
    assert result["perplexity"] != fp8_only["perplexity"]  # the cache is quantized, not only the weights
    verdicts = goals(report)
    assert report["verdict"] == "fail" and verdicts["accuracy.perplexity.max_drop_pct"] is False
    assert verdicts["size.max_ratio"] is True and verdicts["accuracy.generation_prefix_tokens.min"] is True
    # measured (docs/BENCHMARKS.md): 1.045x perplexity and top-1 agreement 0.882 (FP8 alone: 1.039x, 0.894)
    assert 1.035 < result["perplexity"] / base["perplexity"] < 1.06 and 0.86 < result["top1_agreement"] < 0.90
    assert result["perplexity"] > fp8_only["perplexity"]


@shipped("smollm2-w8a8-int8.yaml", every=True)
def test_smollm2_w8a8_int8_passes_with_every_block_linear_at_8_bits(smollm2_tasks):
    report = smollm2_tasks.report("smollm2-w8a8-int8")
    quantize, export = report["stages"]
    assert quantize["quantized_linear_layers"] == 210 and quantize["smoothed_groups"] == 60
    assert quantize["smoothing_output_change"] < 1e-4  # smoothing kept the float function
    assert export["format"] == "int-quantized" and export["reload_max_abs_diff"] <= 1e-4
    assert all(goals(report).values()), report["gate"]
    base, result = report["baseline"]["metrics"], report["result"]["metrics"]
    # measured (docs/BENCHMARKS.md): 1.012x perplexity, top-1 agreement 0.926, 0.409x size
    assert 1.0 < result["perplexity"] / base["perplexity"] < 1.03 and 0.9 < result["top1_agreement"] < 0.96


@shipped("smollm2-onnx-int4-decode.yaml", every=True)
def test_smollm2_int4_decodes_faster_than_fp32_with_the_kv_cache(tmp_path):
    report = run_shipped("smollm2-onnx-int4-decode.yaml", "smollm2", tmp_path).json
    base, result = report["baseline"]["generation"], report["result"]["generation"]
    assert base["prompt_tokens"] == result["prompt_tokens"] == 128 and result["new_tokens"] == 32
    assert result["decode_ms_per_token"] < base["decode_ms_per_token"]
    assert report["stages"][1]["int4_matmuls"] == 30 * 7
    assert all(goals(report).values()), report["gate"]


@shipped("smollm2-onnx-int4-gptq.yaml", every=True)
def test_smollm2_torch_gptq_exported_to_matmulnbits_meets_the_published_bar(smollm2):
    report = smollm2.report("smollm2-onnx-int4-gptq")
    quantize, export = report["stages"]
    assert quantize["grid"] == "asymmetric" and quantize["act_order"] and quantize["quantized_linear_layers"] == 210
    assert export["int4_matmuls"] == 30 * 7 and export["max_abs_diff"] <= 1e-3
    assert all(goals(report).values()), report["gate"]
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    assert 1.05 < ratio < 1.125  # 1.092x measured through the torch path (docs/BENCHMARKS.md)


def test_lora_fixture_learned_sentiment():
    record = json.loads((real_fixture("sentiment-lora") / "fixture.json").read_text())
    assert record["test_accuracy"] > 0.7  # the base encoder with an untrained head is at chance (~0.5)
    assert record["r"] == 8 and (real_fixture("sentiment-lora") / "adapter_model.safetensors").exists()


def test_lora_merge_int8_recipe_passes_against_the_unmerged_adapter(tmp_path):
    result = run_shipped("minilm-sentiment-lora-int8.yaml", "minilm", tmp_path)
    assert all(goals(result.json).values()), result.json["gate"]
    assert_latency_measured(result.json)
    merge = result.json["stages"][0]
    assert merge["max_abs_diff"] <= 1e-4 and merge["adapter_effect_max_abs"] > 0.1
    baseline = result.json["baseline"]
    assert baseline["model"] == "checkpoint + 1 LoRA adapter(s), unmerged (PEFT)"
    assert baseline["metrics"]["accuracy"] > 0.7  # the adapter's head is in the baseline, not a random one


@shipped("smollm2-nf4.yaml", every=True)
def test_smollm2_nf4_reloads_4bit_shrinks_and_fails_the_perplexity_bar(smollm2):
    from compressor.artifacts import TorchModel
    from compressor.checkpoint import load_torch_model

    report = smollm2.report("smollm2-nf4")
    quantize = report["stages"][0]
    assert quantize["quantized_linear_layers"] == 30 * 7 and quantize["kept_in_float"] == ["lm_head"]
    module = load_torch_model(TorchModel(Path(report["result"]["artifact"]), "text-generation"))
    assert sum(type(m).__name__ == "Linear4bit" for m in module.modules()) == 30 * 7
    assert goals(report) == {"evaluation.consistent": True, "accuracy.perplexity.max_drop_pct": False,
                             "accuracy.top1_agreement.min": False, "size.max_ratio": True}
    ratio = report["result"]["metrics"]["perplexity"] / report["baseline"]["metrics"]["perplexity"]
    assert 1.15 < ratio < 1.5  # measured 1.283: real 4-bit loss, not a broken model


@pytest.fixture(scope="module")
def half_precision(request, tmp_path_factory):
    return ShippedGroup("compare-minilm-half.txt", "sentiment-classifier", request, tmp_path_factory)


@shipped("minilm-sentiment-bf16.yaml", "minilm-sentiment-onnx-fp16.yaml", every=True)
def test_half_precision_classifiers_pass_and_halve_the_size(half_precision):
    bf16 = half_precision.report("minilm-sentiment-bf16")
    assert all(goals(bf16).values()), bf16["gate"]
    assert bf16["result"]["backend"] == "torch-cpu-bfloat16" and bf16["stages"][0]["relative_diff"] < 0.01
    fp16 = half_precision.report("minilm-sentiment-onnx-fp16")
    assert all(goals(fp16).values()), fp16["gate"]
    assert fp16["stages"][1]["relative_diff"] < 0.001
    for report in (bf16, fp16):
        assert_latency_measured(report)
        assert report["result"]["size_mb"] < 0.55 * report["baseline"]["size_mb"]


@pytest.fixture(scope="module")
def minilm_comparison(request, tmp_path_factory):
    """The shipped sentiment-classifier recipes the selected tests need, run by `compress compare` against one
    baseline (recipes/compare-minilm.txt; the table is under test)."""
    return ShippedGroup("compare-minilm.txt", "sentiment-classifier", request, tmp_path_factory)


# The ONNX fp32 recipe (export and fusion, nothing quantized) is beyond the focused set: the demo runs the
# same two stages, and the stage cache shares them; `make test-recipes` adds it to this comparison.
@shipped("minilm-sentiment-int8-dynamic.yaml", "minilm-sentiment-int8-static.yaml")
def test_compare_minilm_set_ranks_every_recipe_against_one_baseline(minilm_comparison):
    summary = json.loads((minilm_comparison.out / "compare.json").read_text())
    wanted = {name.removesuffix(".yaml") for name in minilm_comparison.recipes}
    assert {r["recipe"] for r in summary["recipes"]} == wanted and len(summary["rows"]) == len(wanted) + 1
    baseline = summary["baseline"]
    assert baseline["metric"] > 0.8 and summary["evaluation"]["samples"] == 2114
    assert all(r["speedup_interval"][0] <= r["speedup"] <= r["speedup_interval"][1] for r in summary["recipes"])
    assert any(r["pareto"] for r in summary["recipes"]) and any(r["verdict"] == "pass" for r in summary["recipes"])
    assert (minilm_comparison.out / "compare.png").stat().st_size > 10_000


@shipped("minilm-sentiment-int8-dynamic.yaml")
def test_demo_minilm_sentiment_passes(minilm_comparison):
    report = minilm_comparison.report("minilm-sentiment-int8-dynamic")
    assert all(goals(report).values()), report["gate"]
    assert_latency_measured(report)
    assert report["evaluation"]["samples"] == 2114
    assert report["baseline"]["metrics"]["accuracy"] > 0.8
    assert report["result"]["size_mb"] < 0.3 * report["baseline"]["size_mb"]


@shipped("minilm-sentiment-onnx-fp32.yaml", every=True)
def test_sentiment_onnx_fp32_changes_nothing(minilm_comparison):
    report = minilm_comparison.report("minilm-sentiment-onnx-fp32")
    assert report["verdict"] == "pass", report["gate"]
    assert report["result"]["metrics"]["agreement"] >= 0.999


@shipped("minilm-sentiment-int8-static.yaml")
def test_sentiment_int8_static_passes(minilm_comparison):
    report = minilm_comparison.report("minilm-sentiment-int8-static")
    assert all(goals(report).values()), report["gate"]
    assert_latency_measured(report)
    base, cand = report["baseline"]["metrics"], report["result"]["metrics"]
    assert base["accuracy"] - cand["accuracy"] <= 0.01


# 400 distillation steps (about 160 s on 2 cores): beyond the focused set; structured pruning of a real
# model is checked in it by tests/test_prune_structured.py (SmolLM2: pruned, reloaded, exported)
@shipped("minilm-sentiment-ffn-pruned-int8.yaml", every=True)
def test_classifier_ffn_pruned_int8_keeps_accuracy_and_shrinks_the_ffn(minilm_comparison):
    report = minilm_comparison.report("minilm-sentiment-ffn-pruned-int8")
    verdicts = goals(report)
    assert verdicts["accuracy.accuracy.max_drop"] and verdicts["size.max_ratio"], report["gate"]
    # The 4.0x latency goal depends on the CPU: met on AMD EPYC (4.9x), missed on Intel Xeon with AMX
    # (2.7x), where torch fp32 is faster; benchmarks/pruning.py measures it.
    assert_latency_measured(report)
    prune = report["stages"][0]
    assert (prune["channels_before"], prune["channels_after"]) == (6 * 1536, 6 * 768)
    # per token and layer: projections 4 x 384^2, FFN 2 x 384 x 1536 -> half, attention 2 x 128 x 384
    assert prune["macs_ratio"] == pytest.approx(0.684, abs=0.003) and prune["reload_max_abs_diff"] == 0
    assert prune["recover_loss_end"] < prune["recover_loss_start"]
    import onnx

    graph = onnx.load(report["result"]["artifact"], load_external_data=False).graph
    widths = {tuple(t.dims) for t in graph.initializer if len(t.dims) == 2}
    assert (384, 768) in widths and (384, 1536) not in widths  # the exported FFN really is narrower
