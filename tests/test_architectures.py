"""The support matrix: tiny random models of the mainstream decoder architectures (tests/architectures.py),
each crossed with every kind of weight-changing and exporting stage. Every cell either works, checked by a
property that fails when the stage did nothing or did it wrong, or is refused with exit 2 or 3 and a reason;
never an internal error, never a silent no-op. docs/ARCHITECTURES.md is written from these results
(`COMPRESS_WRITE_MATRIX=1`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from compressor.anatomy import open_for_compression
from compressor.artifacts import OnnxModel, TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import CompressError
from compressor.recipe import StageConfig
from compressor.shards import read_state
from compressor.stages import REGISTRY, StageContext

from .architectures import ARCHITECTURES, MOE, build_architecture
from .test_merge_lora import make_adapter

TASK = "text-generation"
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
RESULTS: dict[tuple[str, str], str] = {}
RESULT_FOLDERS: dict[tuple[str, str], Path] = {}  # each torch cell's result, for the layer-by-layer comparison
# (kind, a cell's first stage config as JSON) -> (its result, its record): a cell starting with the same stage
# (int4 gptq -> ONNX after int4 gptq, int8 static's export, fp8 -> compressed-tensors) continues from it
FIRST_STAGES: dict[tuple[str, str], tuple] = {}
DOC = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md"


def _calibration(text_file) -> dict:
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 8, "max_length": 32, "batch_size": 4}


# cell -> stage configs in order (a function of the calibration settings)
CELLS = {
    "prune magnitude 50%": lambda cal: [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
    "prune wanda 50%": lambda cal: [{"type": "prune", "method": "wanda", "sparsity": 0.5, "calibration": cal}],
    "prune sparsegpt 2:4": lambda cal: [{"type": "prune", "method": "sparsegpt", "pattern": "2:4",
                                         "calibration": cal}],
    "prune structured": lambda cal: [{"type": "prune", "kind": "structured", "channels": 0.25}],
    "prune structured heads": lambda cal: [{"type": "prune", "kind": "structured", "heads": 0.5}],
    "int8 dynamic": lambda cal: [{"type": "quantize", "scheme": "int8-dynamic"}],
    "int8 weight-only": lambda cal: [{"type": "quantize", "scheme": "int8-weight-only"}],
    "int8 static (ONNX)": lambda cal: [{"type": "export_onnx"},
                                       {"type": "quantize", "scheme": "int8-static", "calibration": cal}],
    "int4 rtn": lambda cal: [{"type": "quantize", "scheme": "int4-weight-only", "block_size": 16}],
    "int4 gptq": lambda cal: [{"type": "quantize", "scheme": "int4-weight-only", "algorithm": "gptq",
                               "block_size": 16, "symmetric": True, "calibration": cal}],
    "int4 awq": lambda cal: [{"type": "quantize", "scheme": "int4-weight-only", "algorithm": "awq",
                              "block_size": 16, "symmetric": True, "calibration": cal}],
    "int4 gptq layer by layer": lambda cal: [{**CELLS["int4 gptq"](cal)[0], "execution": "layerwise"}],
    "prune sparsegpt 2:4 layer by layer": lambda cal: [{**CELLS["prune sparsegpt 2:4"](cal)[0],
                                                        "execution": "layerwise"}],
    "nf4": lambda cal: [{"type": "quantize", "scheme": "nf4"}],
    "fp8": lambda cal: [{"type": "quantize", "scheme": "fp8"}],
    "w8a8-int8": lambda cal: [{"type": "quantize", "scheme": "w8a8-int8", "calibration": cal}],
    "cast bfloat16": lambda cal: [{"type": "cast", "dtype": "bfloat16", "rtol": 0.2}],
    "merge_lora": lambda cal: [{"type": "merge_lora", "adapters": [{"path": "ADAPTER"}]}],
    "export_onnx": lambda cal: [{"type": "export_onnx"}],
    "export_onnx with past": lambda cal: [{"type": "export_onnx", "with_past": True}],
    "int4 gptq -> ONNX": lambda cal: [CELLS["int4 gptq"](cal)[0], {"type": "export_onnx"}],
    "int4 gptq -> compressed-tensors": lambda cal: [CELLS["int4 gptq"](cal)[0], {"type": "export_compressed_tensors"}],
    "fp8 -> compressed-tensors": lambda cal: [CELLS["fp8"](cal)[0], {"type": "export_compressed_tensors"}],
    "w8a8-int8 -> compressed-tensors": lambda cal: [CELLS["w8a8-int8"](cal)[0], {"type": "export_compressed_tensors"}],
    "fp8 + FP8 KV cache": lambda cal: [{"type": "quantize", "scheme": "fp8", "kv_cache": "fp8", "calibration": cal}],
    "fp8 static -> ONNX Q/DQ": lambda cal: [{"type": "quantize", "scheme": "fp8", "activations": "static",
                                             "calibration": cal}, {"type": "export_onnx"}],
    "export_aoti": lambda cal: [{"type": "export_aoti"}],
}
# Cells whose refusal is the expected answer, with the words it must give (a guard against a refusal
# appearing where a cell worked before, or for another reason)
EXPECTED_REFUSALS = {
    ("falcon", "int4 gptq -> compressed-tensors"): "FalconLinear",
    ("gpt2", "int4 gptq -> compressed-tensors"): "Conv1D",
    ("gpt_oss", "int4 gptq -> compressed-tensors"): "gate and up interleaved",
    ("olmo2", "w8a8-int8"): "no norm inside olmo2's blocks",
    ("olmo2", "w8a8-int8 -> compressed-tensors"): "no norm inside olmo2's blocks",
    ("opt", "fp8 -> compressed-tensors"): "(tokens, features) inputs",
    ("opt", "w8a8-int8 -> compressed-tensors"): "(tokens, features) inputs",
    **{(kind, "fp8 + FP8 KV cache"): "found no attention layer with a key / value cache"
       for kind in ("gpt2", "falcon", "gpt_neox")},
    **{(kind, f"{scheme} -> compressed-tensors"): "experts as fused tensors"
       for kind in ("qwen3_moe", "mixtral", "deepseek_v3") for scheme in ("fp8", "w8a8-int8")},
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {kind: build_architecture(root / kind, kind) for kind in ARCHITECTURES}


def _logits(artifact) -> np.ndarray:
    module = load_torch_model(artifact)
    with torch.no_grad():
        return module(IDS.to(next(module.parameters()).device)).logits.float().numpy()


def _expert_zeros(module) -> float:
    """Share of zeros in the experts' weights (fused tensors or per-expert layers)."""
    parts = open_for_compression(module)
    weights = [layer.weight for name, layer in parts.linears.items() if parts.expert_group_of(name) is not None]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


def _check(cell: str, kind: str, source: Path, result, records: list[dict]) -> str:
    """The property each kind of cell must show; returns what the matrix cell says."""
    last = records[-1]
    if cell.startswith("prune") and "structured" not in cell:
        assert last["sparsity_pruned_layers"] >= 0.45, last["sparsity_pruned_layers"]
        if kind in MOE:  # the experts themselves are pruned, in the saved folder
            assert _expert_zeros(load_torch_model(result)) >= 0.45
            assert last["experts_changed_share"] == 1.0
            if "calibration_samples" in last:  # every expert calibrated, tokens counted
                counts = last["routed_tokens_per_expert"]
                assert counts and all(sum(v) > 0 for v in counts.values())
        return "works"
    if cell.startswith("prune structured"):
        assert last["params_ratio"] < 0.99 and last["reload_max_abs_diff"] <= 1e-4, last
        return "works"
    if cell.startswith(("int4", "int8 weight", "int8 dynamic", "fp8", "w8a8")):
        quantized = records[0].get("quantized_linear_layers")
        assert quantized and quantized > 0
        if kind in MOE and records[0].get("block_weights_changed_share") is not None:
            assert records[0]["experts_changed_share"] == 1.0
        if cell == "int4 awq":  # groups were balanced, and balancing beat plain rounding on the compared outputs
            assert records[0]["awq_groups_scaled"] > 0 and records[0]["awq_error_vs_rtn_mean"] < 1, records[0]
        if "KV cache" in cell:  # every block's attention calibrated, not just some
            assert records[0]["kv_cache"]["attention_layers"] == 2 and records[0]["kv_cache"]["tokens_seen"] > 0
        if not cell.startswith(("int8 dynamic", "fp8", "w8a8")):  # weight-only: the token table too (int8 default)
            assert records[0]["embeddings"] == "int8", records[0].get("embeddings")
    if isinstance(result, OnnxModel):
        if cell == "int4 gptq -> ONNX":  # the int8 table keeps its codes in the graph; the untied head is float
            assert last["embeddings"] == "int8 (GatherBlockQuantized)" and "float_vocabulary_left" not in last, last
            assert last["head"] == "float (dequantized)", last
        if "max_abs_diff" in last:  # an export: checked against torch
            assert last["max_abs_diff"] <= last["atol"]
        else:  # a quantizer on the graph: nodes quantized
            counted = last["quantized_nodes"]
            assert (sum(counted.values()) if isinstance(counted, dict) else counted) > 0, last
        return "works"
    if cell.endswith("compressed-tensors"):
        assert last["reload_max_abs_diff"] <= last["atol"] and last["quantized_linear_layers"] > 0
        return "works"
    if cell == "export_aoti":  # the compiled package against the float model, on the same inputs
        assert last["relative_diff"] <= last["rtol"] and result.path.stat().st_size > 0, last
        return "works"
    if cell == "cast bfloat16":  # every floating tensor, fused experts included
        assert records[0]["cast_parameter_share"] == 1.0, records[0]
    if cell == "merge_lora":  # every layer the adapter's target names match, as the anatomy sees them
        targets = records[0]["adapters"][0]["target_modules"]
        matched = [n for n in open_for_compression(load_torch_model(TorchModel(source, TASK))).linears
                   if n.rsplit(".", 1)[-1] in targets]
        assert records[0]["merged_layers"] == len(matched) >= 4 and records[0]["changed_parameter_share"] > 0
    # torch results: the outputs moved (the stage did something) but stayed finite
    before, after = _logits(TorchModel(source, TASK)), _logits(result)
    assert np.isfinite(after).all()
    assert not np.allclose(before, after, atol=1e-7), "the result computes exactly what the checkpoint did"
    return "works"


def _run_cell(kind: str, cell: str, source: Path, workdir: Path, text_file) -> str:
    adapter = TypeAdapter(StageConfig)
    configs = CELLS[cell](_calibration(text_file))
    if cell == "merge_lora":
        # the adapter targets block 0's first two linear layers outside any expert (attention projections);
        # fused experts are opened as per-expert layers, as every stage opens them
        parts = open_for_compression(load_torch_model(TorchModel(source, TASK)))
        first = [name.rsplit(".", 1)[-1] for name in parts.linears if parts.block_index(name) == 0
                 and parts.expert_group_of(name) is None][:2]
        make_adapter(source, TASK, workdir / "adapter", first)
        configs[0]["adapters"][0]["path"] = str(workdir / "adapter")
    artifact, records = TorchModel(source, TASK), []
    for index, raw in enumerate(configs):
        first = (kind, json.dumps(raw, sort_keys=True))
        if index == 0 and first in FIRST_STAGES:  # this stage already ran on this model in another cell
            artifact, record = FIRST_STAGES[first]
            if isinstance(artifact, TorchModel):  # from its files: the other cell's in-memory module stays its own
                artifact = TorchModel(artifact.path, TASK, transforms=list(artifact.transforms))
            records.append(record)
            continue
        config = adapter.validate_python(raw)
        stage = REGISTRY[config.type]
        problem = stage.check(config, artifact.kind, TASK)
        assert problem is None, problem
        for module in stage.backends(config, artifact.kind):
            import importlib.util
            if importlib.util.find_spec(module.split(".")[0]) is None:
                return f"refused (exit 3): needs {module.split('.')[0]}"
        missing = stage.unavailable(config, artifact.kind)
        if missing:
            return f"refused (exit 3): {missing}"
        ctx = StageContext(workdir / str(index), TASK, threads=2)
        ctx.workdir.mkdir(parents=True)
        artifact = stage.run(config, artifact, ctx)
        records.append({"type": config.type, **ctx.details})
        if index == 0:
            FIRST_STAGES[first] = (artifact, records[0])
    RESULT_FOLDERS[(kind, cell)] = artifact.path
    if cell.endswith("layer by layer"):  # the whole-model path's tensors, written block by block
        assert records[0]["execution"] == "layerwise"
        # the same stage run whole is a cell of its own, run earlier in the session: its files, else a run now
        folder = RESULT_FOLDERS.get((kind, cell.removesuffix(" layer by layer")))
        if folder is None or not folder.is_dir():
            whole = adapter.validate_python({**configs[0], "execution": "whole"})
            ctx = StageContext(workdir / "whole", TASK, threads=2)
            ctx.workdir.mkdir(parents=True)
            folder = REGISTRY[whole.type].run(whole, TorchModel(source, TASK), ctx).path
        expected, written = read_state(folder), read_state(artifact.path)
        assert set(written) == set(expected)
        for name, tensor in expected.items():
            assert torch.allclose(written[name].float(), tensor.float(), rtol=0, atol=1e-6), name
    return _check(cell, kind, source, artifact, records)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_support_matrix(kind, cell, zoo, text_file, tmp_path):
    if cell == "export_aoti" and not os.environ.get("COMPRESS_MATRIX_AOTI"):
        pytest.skip("AOTInductor compiles C++ for minutes per model; set COMPRESS_MATRIX_AOTI=1")
    try:
        outcome = _run_cell(kind, cell, zoo[kind], tmp_path, text_file)
    except CompressError as exc:
        assert exc.exit_code in (2, 3), f"exit {exc.exit_code}: {exc}"
        expected = EXPECTED_REFUSALS.get((kind, cell))
        if expected is not None:
            assert expected in str(exc)
        # the model's temporary folder would make the generated page differ on every run
        outcome = f"refused (exit {exc.exit_code}): {str(exc).splitlines()[0]}".replace(str(zoo[kind]), kind)
    RESULTS[(kind, cell)] = outcome


def test_write_matrix():
    """Runs after the matrix (pytest keeps file order): docs/ARCHITECTURES.md from its results."""
    if not os.environ.get("COMPRESS_WRITE_MATRIX"):
        pytest.skip("set COMPRESS_WRITE_MATRIX=1 to rewrite docs/ARCHITECTURES.md from this run")
    if len(RESULTS) < len(ARCHITECTURES) * (len(CELLS) - 1):
        pytest.skip("the whole matrix did not run in this session")
    lines = ["# Supported architectures", "",
             "Generated by `COMPRESS_WRITE_MATRIX=1 pytest tests/test_architectures.py` from the support matrix's "
             "own results: tiny random models (hidden size 64, two blocks, four experts with two chosen per token "
             "for mixture-of-experts families) built from each architecture's transformers config, every stage "
             "run on each. **works** means the stage ran and its check held (targeted weights sparse, experts "
             "included; quantized layers swapped and outputs moved; exported graph within atol of torch; "
             "compressed-tensors folder reloaded by transformers within atol). A refusal is the stage's own "
             "message, given before it writes anything.", "",
             "| stage | " + " | ".join(ARCHITECTURES) + " |", "|---|" + "---|" * len(ARCHITECTURES)]
    notes: list[str] = []
    for cell in CELLS:
        row = []
        for kind in ARCHITECTURES:
            outcome = RESULTS.get((kind, cell), "not run")
            if outcome == "works":
                row.append("works")
            elif outcome == "not run":
                row.append("not run")
            else:
                if outcome not in notes:
                    notes.append(outcome)
                row.append(f"refused [{notes.index(outcome) + 1}]")
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    lines += ["", "Refusals:", ""] + [f"{i + 1}. {note.replace('|', '/')}" for i, note in enumerate(notes)]
    DOC.write_text("\n".join(lines) + "\n")
