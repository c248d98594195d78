"""export_aoti: a tiny Llama compiled by AOTInductor into model.pt2 through `compress run`, gated, and the
package loaded again in a fresh Python that imports torch alone; what planning refuses; the runner's
refusal of a package from another torch. The CUDA path runs where a GPU is (marked gpu)."""

import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compressor.aoti import aoti_problem
from compressor.artifacts import AotiModel, TorchModel
from compressor.checkpoint import load_torch_model
from compressor.cli import main
from compressor.errors import BackendMissing, UserError
from compressor.planning import check_device, plan
from compressor.recipe import load_recipe
from compressor.runners import make_runner

from .conftest import write_recipe

RECIPE = """
name: tiny-aoti
task: text-generation
stages:
{stages}
evaluation:
  data: {{path: "{data}"}}
  max_length: 32
  batch_size: 4
benchmark: {{batch_size: 2, seq_len: 32, iterations: 6, warmup: 1, memory: false}}
goals:
  accuracy:
    - {{metric: perplexity, max_drop_pct: 0.01}}
    - {{metric: top1_agreement, min: 0.999}}
"""
AOTI_CPU = "  - type: export_aoti\n    device: cpu\n    dtype: float32"
no_cpu_compiler = pytest.mark.skipif(aoti_problem("cpu") is not None, reason=str(aoti_problem("cpu")))


def aoti_recipe(tmp_path, data, stages=AOTI_CPU, name="recipe.yaml"):
    return write_recipe(tmp_path, RECIPE.format(stages=stages, data=data), name)


@pytest.fixture(scope="module")
def compiled_run(tiny_llama, text_file, tmp_path_factory):
    """`compress run` of the CPU recipe: (exit code, output, run folder)."""
    folder = tmp_path_factory.mktemp("aoti")
    recipe = aoti_recipe(folder, text_file)
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tiny_llama), "--out", str(folder / "out")])
    return outcome.exit_code, outcome.output, folder / "out"


@no_cpu_compiler
def test_compress_run_compiles_gates_and_ships_the_package(compiled_run):
    code, output, out = compiled_run
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["result"]["backend"] == "aoti-cpu-float32"
    assert report["result"]["artifact"].endswith("model.pt2") and (out / "model.pt2").stat().st_size > 10_000
    stage = report["stages"][0]
    assert stage["type"] == "export_aoti" and stage["output"] == "aoti" and stage["relative_diff"] <= 1e-4
    assert stage["inputs"] == ["input_ids", "attention_mask"] and stage["dynamic"] == ["batch_size", "sequence_length"]
    assert stage["compile_seconds"] > 0 and any("use_cache=False" in note for note in report["notes"])
    # the same windows through the package and the eager model: the same perplexity, the same next tokens
    base, result = report["baseline"]["metrics"], report["result"]["metrics"]
    assert result["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4) and result["top1_agreement"] == 1.0
    metadata = json.loads((out / "model.pt2.json").read_text())
    assert metadata["torch"] == torch.__version__ and metadata["device"] == "cpu" and metadata["use_cache"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.pt2", "model.pt2.json"} <= set(manifest["artifact"])


FRESH_LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch

    package = torch._inductor.aoti_load_package(sys.argv[1])
    ids = torch.from_numpy(np.load(sys.argv[2]))
    out = package(ids, torch.ones_like(ids))
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.save(sys.argv[3], out.float().numpy())
    print("transformers imported:", "transformers" in sys.modules)
""")


@no_cpu_compiler
def test_the_package_runs_in_a_fresh_python_without_the_model_code(compiled_run, tiny_llama, tmp_path):
    code, output, out = compiled_run
    assert code == 0, output
    ids = np.random.default_rng(0).integers(5, 60, size=(3, 11)).astype(np.int64)  # shapes it was not traced at
    np.save(tmp_path / "ids.npy", ids)
    (tmp_path / "load.py").write_text(FRESH_LOADER)
    done = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(out / "model.pt2"), str(tmp_path / "ids.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "transformers imported: False" in done.stdout
    module = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    actual = np.load(tmp_path / "logits.npy")
    assert actual.shape == expected.shape == (3, 11, module.config.vocab_size)
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


@no_cpu_compiler
def test_a_package_from_another_torch_or_without_metadata_is_refused(compiled_run, tmp_path):
    code, output, out = compiled_run
    assert code == 0, output
    package = AotiModel(tmp_path / "model.pt2", "text-generation")
    package.path.write_bytes((out / "model.pt2").read_bytes())
    with pytest.raises(UserError, match="no model.pt2.json beside it"):
        make_runner(package, "result")
    metadata = json.loads((out / "model.pt2.json").read_text())
    package.metadata_path.write_text(json.dumps({**metadata, "torch": "2.0.0"}))
    with pytest.raises(UserError, match="compiled by torch 2.0.0.*load only in the torch that built them"):
        make_runner(package, "result")
    # a compiled package does not check shapes itself (a wrong one aborts the process): the runner does
    runner = make_runner(AotiModel(out / "model.pt2", "text-generation"), "result")
    too_long = np.ones((1, metadata["max_sequence_length"] + 1), dtype=np.int64)
    with pytest.raises(UserError, match="sequence up to 256.*fed \\[1, 257\\]"):
        runner({"input_ids": too_long, "attention_mask": too_long})


def test_planning_refuses_what_cannot_work(text_file, tmp_path):
    def refused(stages, match):
        recipe = aoti_recipe(tmp_path, text_file, stages).read_text()
        with pytest.raises(UserError, match=match):
            plan(load_recipe(write_recipe(tmp_path, recipe, "r.yaml")))

    refused("  - type: quantize\n    scheme: int8-weight-only\n" + AOTI_CPU, r"stages\[0\] \(quantize\) comes first")
    refused(AOTI_CPU + "\n  - type: cast\n    dtype: bfloat16", "writes a serving format that no stage reads")
    refused(AOTI_CPU + "\n    max_sequence_length: 16", "max_sequence_length 16 is shorter than the benchmark's 32")
    refused(AOTI_CPU + "\n    static_axes: {batch_size: 1}", "static_axes.batch_size=1 but the benchmark uses 2")
    generate = "\n".join(line for line in RECIPE.splitlines() if not line.startswith("benchmark"))
    generate = write_recipe(tmp_path, generate.format(stages=AOTI_CPU, data=text_file)
                            + "\nbenchmark: {generate: {prompt_tokens: 8, new_tokens: 4}}\n", "g.yaml")
    with pytest.raises(UserError, match="benchmark.generate .* an AOTInductor package"):
        plan(load_recipe(generate))


def test_a_package_is_timed_on_the_device_it_was_compiled_for(text_file, tmp_path):
    steps = plan(load_recipe(aoti_recipe(tmp_path, text_file)))
    with pytest.raises(UserError, match=r"stages\[0\] \(export_aoti\) makes a result that runs on cpu.*--device cpu"):
        check_device("cuda", "cuda", steps)


@pytest.mark.skipif(aoti_problem("cuda") is None, reason="this machine can compile CUDA packages")
def test_a_cuda_package_on_a_machine_without_a_gpu_is_valid_but_exit_3(text_file, tmp_path):
    recipe = aoti_recipe(tmp_path, text_file, "  - type: export_aoti\n    device: cuda\n    dtype: bfloat16")
    with pytest.raises(BackendMissing, match=r"stages\[0\] \(export_aoti\): an AOTInductor package for cuda") as error:
        plan(load_recipe(recipe))
    assert error.value.exit_code == 3
    outcome = CliRunner().invoke(main, ["validate", str(recipe)], terminal_width=200)
    assert outcome.exit_code == 0 and "valid; cannot run on this machine" in outcome.output


@pytest.mark.gpu
@pytest.mark.skipif(aoti_problem("cuda") is not None, reason=str(aoti_problem("cuda")))
def test_cuda_bfloat16_package_end_to_end(tiny_llama, text_file, tmp_path):
    stages = "  - type: export_aoti\n    device: cuda\n    dtype: bfloat16"
    recipe = write_recipe(tmp_path, RECIPE.format(stages=stages, data=text_file).replace(
        "max_drop_pct: 0.01", "max_drop_pct: 5").replace("min: 0.999", "min: 0.8"))
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tiny_llama), "--out", str(tmp_path / "out"),
                                        "--device", "cuda"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["result"]["backend"] == "aoti-cuda-bfloat16" and report["stages"][0]["gpu"]
    assert report["baseline"]["backend"] == "torch-cuda-float32"


def test_a_causal_lm_package_takes_what_its_tokenizer_makes(tiny_gpt2, tiny_llama, tmp_path):
    """GPT-2's forward accepts token_type_ids and adds their embeddings: a package taking them would be fed
    zeros (token 0's embedding added at every position) while the model it is compared with gets none,
    74% of the output range apart. Causal LMs take input_ids and attention_mask, as their ONNX graphs do;
    encoders keep token_type_ids."""
    from compressor.stages.export.export_aoti import package_inputs

    from .conftest import build_tiny

    gpt2 = load_torch_model(TorchModel(tiny_gpt2, "text-generation"))
    assert "token_type_ids" in inspect.signature(gpt2.forward).parameters
    assert package_inputs(gpt2, "text-generation") == ("input_ids", "attention_mask")
    bert = load_torch_model(TorchModel(build_tiny(tmp_path / "bert", "text-classification"), "text-classification"))
    assert package_inputs(bert, "text-classification") == ("input_ids", "attention_mask", "token_type_ids")
