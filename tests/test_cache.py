"""The stage cache: keys, reuse with --resume, resuming a killed run, corrupted entries, and the
`compress cache` commands."""

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from compressor import cache
from compressor.artifacts import sha256_file
from compressor.cli import main
from compressor.pipeline import RunOptions, run
from compressor.recipe import load_recipe

from .conftest import TINY_EVALUATION, write_recipe

RECIPE = """
name: tiny-cached
task: text-classification
stages:
  - type: export_onnx
  - type: quantize
    scheme: int8-dynamic
    per_channel: {per_channel}
""" + TINY_EVALUATION + """
goals:
  size: {{max_ratio: 0.9}}
"""


@pytest.fixture
def stage_cache(tmp_path, monkeypatch):
    root = tmp_path / "stage-cache"
    monkeypatch.setenv("COMPRESS_CACHE", str(root))
    return root


def recipe_file(folder, data, per_channel=False, name="recipe.yaml"):
    return write_recipe(folder, RECIPE.format(data=data, per_channel=str(per_channel).lower()), name=name)


def run_recipe(path, model, out, **options):
    return run(load_recipe(path), model, RunOptions(out=out, **options))


def stages(root):
    """The stored stages, the baseline's stored scores left out."""
    return [entry for entry in cache.entries(root) if not entry.meta.get("baseline")]


def test_key_follows_input_config_files_and_code(tmp_path):
    from compressor.stages.lora.merge_lora import MergeLoraConfig
    from compressor.stages.quantize.quantize import Int8DynamicConfig

    config = Int8DynamicConfig(type="quantize", scheme="int8-dynamic")
    key = cache.stage_key("input", config, "text-classification", 2, False)
    assert key == cache.stage_key("input", config, "text-classification", 2, False)
    others = [cache.stage_key("other-input", config, "text-classification", 2, False),
              cache.stage_key("input", config.model_copy(update={"per_channel": not config.per_channel}),
                              "text-classification", 2, False),
              cache.stage_key("input", config, "text-classification", 1, False)]
    assert key not in others and len(set(others)) == 3
    # A file named by `path` is hashed: rewriting it changes the key even though the config does not.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    merge = MergeLoraConfig(type="merge_lora", adapters=[{"path": str(adapter)}])
    before = cache.stage_key("input", merge, "text-classification", 2, False)
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    assert cache.stage_key("input", merge, "text-classification", 2, False) != before


def test_resume_reuses_every_unchanged_stage_and_reruns_from_the_first_change(
        tiny_classifier, sentences_jsonl, tmp_path, stage_cache):
    path = recipe_file(tmp_path, sentences_jsonl)
    first = run_recipe(path, tiny_classifier, tmp_path / "first")
    assert [s["cached"] for s in first.json["stages"]] == [False, False]
    assert len(stages(stage_cache)) == 2
    again = run_recipe(path, tiny_classifier, tmp_path / "again", resume=True)
    assert [s["cached"] for s in again.json["stages"]] == [True, True]
    assert sha256_file(again.out / "model.onnx") == sha256_file(first.out / "model.onnx")
    # The stage's own details survive reuse, and the report says which stages were reused.
    assert again.json["stages"][1]["quantized_nodes"] == first.json["stages"][1]["quantized_nodes"]
    assert "reused" in (again.out / "report.md").read_text()
    # A changed second stage: the export is reused, the quantization runs again.
    changed = recipe_file(tmp_path, sentences_jsonl, per_channel=True, name="changed.yaml")
    third = run_recipe(changed, tiny_classifier, tmp_path / "third", resume=True)
    assert [s["cached"] for s in third.json["stages"]] == [True, False]
    assert sha256_file(third.out / "model.onnx") != sha256_file(first.out / "model.onnx")
    # Without --resume every stage runs, and --no-cache stores nothing.
    assert not any(s["cached"] for s in run_recipe(path, tiny_classifier, tmp_path / "fresh").json["stages"])
    stored = len(cache.entries(stage_cache))
    run_recipe(changed, tiny_classifier, tmp_path / "uncached", cache=False)
    assert len(cache.entries(stage_cache)) == stored


def test_the_baseline_is_evaluated_once_per_checkpoint_and_evaluation(tiny_classifier, sentences_jsonl, tmp_path,
                                                                      stage_cache, monkeypatch):
    import compressor.pipeline as pipeline

    path = recipe_file(tmp_path, sentences_jsonl)
    first = run_recipe(path, tiny_classifier, tmp_path / "first")
    assert [e.meta["stage"] for e in cache.entries(stage_cache) if e.meta.get("baseline")] == ["baseline evaluation"]
    evaluated, evaluate = [], pipeline.evaluate

    def counted(task, runner, *args, **kwargs):
        evaluated.append(runner.name)
        return evaluate(task, runner, *args, **kwargs)
    monkeypatch.setattr(pipeline, "evaluate", counted)
    # Another recipe on the same checkpoint and evaluation: only its result is evaluated, and it is judged
    # against the stored baseline's predictions exactly as against freshly computed ones.
    changed = recipe_file(tmp_path, sentences_jsonl, per_channel=True, name="changed.yaml")
    reused = run_recipe(changed, tiny_classifier, tmp_path / "reused", resume=True).json
    assert evaluated == ["result"]
    assert any("reused from the stage cache" in note for note in reused["notes"])
    fresh = run_recipe(changed, tiny_classifier, tmp_path / "fresh", cache=False).json
    assert evaluated == ["result", "baseline", "result"]
    assert reused["baseline"]["metrics"] == fresh["baseline"]["metrics"] == first.json["baseline"]["metrics"]
    assert reused["result"]["metrics"] == fresh["result"]["metrics"]
    assert reused["baseline"]["classes"] == fresh["baseline"]["classes"]
    # Another evaluation setting is another baseline; without --resume the baseline is evaluated again.
    other = write_recipe(tmp_path, changed.read_text().replace("batch_size: 8", "batch_size: 8\n  max_length: 16"),
                         name="other.yaml")
    run_recipe(other, tiny_classifier, tmp_path / "other", resume=True)
    run_recipe(changed, tiny_classifier, tmp_path / "again")
    assert evaluated == ["result", "baseline", "result", "baseline", "result", "baseline", "result"]
    # A stored entry whose file changed is dropped and the baseline evaluated again.
    stored = next(e for e in cache.entries(stage_cache) if e.meta.get("baseline"))
    (stored.output / "evaluation.json").write_text("{}")
    run_recipe(path, tiny_classifier, tmp_path / "after-damage", resume=True)
    assert evaluated[-2:] == ["baseline", "result"]


KILL_IN_QUANTIZE = textwrap.dedent("""
    import os, signal, sys
    from compressor.stages import REGISTRY
    from compressor.cli import main

    stage = REGISTRY["quantize"]
    original = type(stage).run

    def run_then_die(self, config, artifact, ctx):
        original(self, config, artifact, ctx)  # the output is written, the stage has not returned
        os.kill(os.getpid(), signal.SIGKILL)

    type(stage).run = run_then_die
    sys.exit(main(sys.argv[1:]))
""")


def test_a_run_killed_mid_stage_resumes_to_the_same_artifact(tiny_classifier, sentences_jsonl, tmp_path,
                                                             stage_cache):
    path = recipe_file(tmp_path, sentences_jsonl)
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_QUANTIZE, "run", str(path), "--model",
                             str(tiny_classifier), "--out", str(out)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()  # nothing that looks finished
    stored = cache.entries(stage_cache)
    assert [e.meta["stage"] for e in stored] == ["export_onnx"]  # the killed stage was not stored

    resumed = run_recipe(path, tiny_classifier, out, resume=True)
    assert [s["cached"] for s in resumed.json["stages"]] == [True, False]
    assert not list(tmp_path.glob(".killed.partial-*"))  # the killed run's folder was cleared
    uninterrupted = run_recipe(path, tiny_classifier, tmp_path / "uninterrupted", cache=False)
    assert sha256_file(resumed.out / "model.onnx") == sha256_file(uninterrupted.out / "model.onnx")


def test_a_corrupted_entry_is_dropped_and_the_stage_runs_again(tiny_classifier, sentences_jsonl, tmp_path,
                                                               stage_cache, caplog):
    path = recipe_file(tmp_path, sentences_jsonl)
    first = run_recipe(path, tiny_classifier, tmp_path / "first")
    quantized = next(e for e in cache.entries(stage_cache) if e.meta["stage"] == "quantize")
    (quantized.output / "model.onnx").write_bytes(b"not a model")
    again = run_recipe(path, tiny_classifier, tmp_path / "again", resume=True)
    assert [s["cached"] for s in again.json["stages"]] == [True, False]
    assert "changed since it was stored" in caplog.text
    assert sha256_file(again.out / "model.onnx") == sha256_file(first.out / "model.onnx")


def test_cache_ls_and_clear(tiny_classifier, sentences_jsonl, tmp_path, stage_cache):
    run_recipe(recipe_file(tmp_path, sentences_jsonl), tiny_classifier, tmp_path / "out")
    (stage_cache / f"{cache.TEMPORARY}abc-999999999").mkdir()  # half-written by a run that is gone
    listed = CliRunner().invoke(main, ["cache", "ls"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert "export_onnx" in listed.output and "quantize" in listed.output and "tiny-cached" in listed.output
    assert "baseline evaluation" in listed.output
    assert "2 stored stage(s) and 1 stored baseline score(s)" in listed.output and "1 half-written" in listed.output
    cleared = CliRunner().invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 3 stored stage(s) and baseline score(s)" in cleared.output
    assert not list(stage_cache.iterdir())
    assert "0 stored stage(s)" in CliRunner().invoke(main, ["cache", "ls"]).output


def test_resume_with_no_cache_is_a_usage_error(tiny_classifier, sentences_jsonl, tmp_path):
    result = CliRunner().invoke(main, ["run", str(recipe_file(tmp_path, sentences_jsonl)), "--model",
                                       str(tiny_classifier), "--resume", "--no-cache"])
    assert result.exit_code == 2 and "--no-cache" in result.output
