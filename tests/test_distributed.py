"""Data-parallel calibration: two processes over gloo, each calibrating on half the batches, give the
weights one process gives (the statistics are summed in another order: float tolerance), whole-model
and layer by layer; and `compress run --nproc 2` runs the split end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compressor import distributed
from compressor.artifacts import TorchModel
from compressor.shards import read_state
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.prune.prune import PruneConfig

from .conftest import TINY_EVALUATION, write_recipe
from .test_stages import run_stage

TASK = "text-generation"


def _calibration(text_file) -> dict:
    # 8 batches of 2: each process takes 4
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 16, "max_length": 32, "batch_size": 2}


def _config(kind: str, text_file, **extra):
    if kind == "gptq":
        return Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq", block_size=32,
                                    calibration=_calibration(text_file))
    return PruneConfig(type="prune", method=kind, sparsity=0.5, calibration=_calibration(text_file), **extra)


def _one_rank(rank: int, size: int, port: int, cases: dict, text_file, workdir) -> None:
    """Every case in turn, in one process group (one spawn for all: starting processes costs more than
    calibrating tiny models)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    distributed.start()
    try:
        assert distributed.size() == size and distributed.rank() == rank
        written = {}
        for case, (kind, checkpoint, extra) in cases.items():
            result, _details = run_stage(_config(kind, text_file, **extra), TorchModel(checkpoint, TASK),
                                         workdir / case / f"rank{rank}", TASK)
            written[case] = str(result.path)
        if rank == 0:
            (workdir / "results.json").write_text(json.dumps(written))
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def split_runs(tiny_llama, text_file, tmp_path_factory):
    """case -> (its single-process result, its two-process result) folders."""
    from .test_layerwise import sharded_copy

    root = tmp_path_factory.mktemp("split")
    sharded = sharded_copy(tiny_llama, root / "sharded")
    cases = {kind: (kind, tiny_llama, {}) for kind in ("wanda", "sparsegpt", "gptq")}
    cases["wanda-layerwise"] = ("wanda", sharded, {"execution": "layerwise"})
    mp.spawn(_one_rank, args=(2, distributed._free_port(), cases, text_file, root / "two"), nprocs=2)
    split = json.loads((root / "two" / "results.json").read_text())
    single = {}
    for case, (kind, checkpoint, extra) in cases.items():
        result, details = run_stage(_config(kind, text_file, **extra), TorchModel(checkpoint, TASK),
                                    root / "one" / case, TASK)
        assert details["execution"] == extra.get("execution", "whole")
        single[case] = result.path
    return {case: (single[case], Path(split[case])) for case in cases}


def _weights(path) -> dict:
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return read_state(path)
    raise AssertionError(f"no weights in {path}")


@pytest.mark.parametrize("kind", ["wanda", "sparsegpt", "gptq"])
def test_two_processes_calibrate_like_one(kind, split_runs, tiny_llama):
    single, split = split_runs[kind]
    expected, written = _weights(single), _weights(split)
    assert set(written) == set(expected)
    compared = 0
    for name, tensor in expected.items():
        other = written[name]
        if not tensor.is_floating_point():
            assert torch.equal(other, tensor), name
            continue
        assert torch.allclose(other.float(), tensor.float(), atol=1e-5, rtol=1e-4), name
        if kind != "gptq" and name.endswith("proj.weight"):
            assert torch.equal(other == 0, tensor == 0), f"{name}: pruning masks differ"
            compared += 1
    original = _weights(tiny_llama)
    changed = [n for n, t in expected.items() if n not in original or t.shape != original[n].shape
               or not torch.equal(t, original[n])]
    assert changed, "the stage changed no weight: the comparison would prove nothing"
    assert kind == "gptq" or compared > 0


def test_two_processes_calibrate_layer_by_layer(split_runs):
    single, split = split_runs["wanda-layerwise"]
    expected, written = read_state(single), read_state(split)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name] == 0, tensor == 0), name
        assert torch.allclose(written[name], tensor, atol=1e-6), name


RECIPE = """
name: split-{name}
task: text-generation
stages:
  - type: prune
    method: wanda
    sparsity: 0.5
    calibration: {{data: {{path: "{data}", segment: window}}, samples: 16, max_length: 32, batch_size: 2}}
""" + TINY_EVALUATION + """
goals:
  accuracy:
    - {{metric: perplexity, max_drop_pct: 50}}
    - {{metric: top1_agreement, min: 0.1}}
"""


def _compress(*args, cwd):
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={k: v for k, v in os.environ.items()
                                                     if k not in ("RANK", "WORLD_SIZE")})


def test_compress_run_nproc_2_records_the_split(tiny_llama, text_file, tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.format(name="wanda", data=text_file))
    done = _compress("run", recipe, "--model", tiny_llama, "--out", tmp_path / "run", "--nproc", 2, "--no-cache",
                     "--json", cwd=tmp_path)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    [stage] = report["stages"]
    assert stage["calibration_processes"] == 2
    single, _ = run_stage(_config("wanda", text_file), TorchModel(tiny_llama, TASK), tmp_path / "one", TASK)
    written, expected = read_state(tmp_path / "run" / "model"), read_state(single.path)
    for name, tensor in expected.items():
        assert torch.equal(written[name] == 0, tensor == 0), name
    assert not list(tmp_path.glob("compress-process*.log"))


def test_nproc_without_a_splitting_stage_is_refused(tiny_llama, tmp_path, sentences_jsonl):
    recipe = write_recipe(tmp_path, RECIPE.format(name="magnitude", data=sentences_jsonl)
                          .replace("method: wanda", "method: magnitude")
                          .replace("    calibration: {data: {path: \"" + str(sentences_jsonl)
                                   + "\", segment: window}, samples: 16, max_length: 32, batch_size: 2}\n", ""))
    done = _compress("run", recipe, "--model", tiny_llama, "--out", tmp_path / "run", "--nproc", 2, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no stage of this recipe splits its calibration" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
