"""lm-evaluation-harness tasks and generation fidelity as evaluations: the local tasks are built as documented,
compress's own lm-eval model over its runners scores what lm-eval's Hugging Face class scores (torch, and ONNX
with and without past key/values), the metrics gate a run with their standard errors, and every mistake in the
recipe is refused before a stage runs."""

import json
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_tokenizer, load_torch_model
from compressor.errors import UserError
from compressor.generation_fidelity import Generations, generate, greedy_tokens, prompts
from compressor.lm_harness import collect, runner_lm, score
from compressor.lm_tasks import (NEXT_WORD, SENTENCE_ENDING, TaskRef, next_word_documents, sentence_ending_documents,
                                 write_local_tasks)
from compressor.pipeline import RunOptions, run
from compressor.planning import plan
from compressor.recipe import parse_recipe
from compressor.runners import make_runner
from compressor.stages.export.export_onnx import ExportOnnxConfig

from .conftest import WORDS, write_recipe
from .test_stages import run_stage

pytest.importorskip("lm_eval")
TASK = "text-generation"
LOCAL = [TaskRef(NEXT_WORD), TaskRef(SENTENCE_ENDING)]


def _sentence(rng) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 18))).capitalize() + "."


@pytest.fixture(scope="module")
def sentences_text(tmp_path_factory):
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("lm-eval") / "text.txt"
    path.write_text("\n".join(" ".join(_sentence(rng) for _ in range(4)) for _ in range(40)))
    return path


@pytest.fixture(scope="module")
def bos_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds BOS only, as a causal LM's does (the tests' BERT vocabulary
    would also append its [SEP]), and its blocks' weights ten times larger: at the initial scale the residual
    stream is the token's embedding, and the model only repeats its prompt's last token."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bos") / "llama"
    shutil.copytree(tiny_llama, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.mul_(10)
    model.save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"]["single"] = spec["post_processor"]["single"][:-1]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    settings = json.loads((folder / "tokenizer_config.json").read_text())  # read tokenizer.json as it is
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert load_tokenizer(folder).encode("the film")[-1] != 3
    return folder


@pytest.fixture(scope="module")
def task_dir(sentences_text, tmp_path_factory):
    return write_local_tasks(sentences_text.read_text().splitlines(), str(sentences_text),
                             tmp_path_factory.mktemp("tasks"))


def test_local_tasks_are_cut_as_documented():
    text = ["The cast was very good and the story was funny in the end. A second sentence of the text is here "
            "with words enough to count, ending well.", "Short one."]
    [first, second] = next_word_documents(text)
    assert first == {"context": "The cast was very good and the story was funny in the", "target": " end"}
    assert second["target"] == " well" and second["context"].endswith("ending")
    many = [f"Sentence number {i} says that the film is good and the plot is {WORDS[i]} indeed." for i in range(12)]
    documents = sentence_ending_documents(many)
    assert len(documents) == 12 and documents == sentence_ending_documents(many)  # seeded: the same every run
    for sentence, doc in zip(many, documents):
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert doc["context"] + doc["choices"][doc["label"]] == sentence
    assert {doc["label"] for doc in documents} != {documents[0]["label"]}  # the true ending is not always first


def test_too_little_text_for_a_local_task_names_the_source(tmp_path):
    with pytest.raises(UserError, match="notes.txt: too little text for the local task compress_next_word"):
        write_local_tasks(["Too short."], "notes.txt", tmp_path)


def _requests(task_dir):
    from lm_eval.api.instance import Instance

    rows = [json.loads(line) for line in (task_dir.parent / f"{NEXT_WORD}.jsonl").read_text().splitlines()[:12]]
    choice = json.loads((task_dir.parent / f"{SENTENCE_ENDING}.jsonl").read_text().splitlines()[0])
    pairs = [(r["context"], r["target"]) for r in rows] + [(choice["context"], c) for c in choice["choices"]]
    pairs.append(("", " the film"))  # an empty context: scored after the prefix token
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_runner_model_scores_what_lm_evals_hf_model_scores(bos_llama, task_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    tokenizer = load_tokenizer(bos_llama)
    module = load_torch_model(TorchModel(bos_llama, TASK))
    reference = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=4, device="cpu").loglikelihood(
        _requests(task_dir), disable_tqdm=True)
    exported = run_stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), TorchModel(bos_llama, TASK),
                         tmp_path / "plain", TASK)[0]
    with_past = run_stage(ExportOnnxConfig(type="export_onnx", with_past=True, atol=1e-3),
                          TorchModel(bos_llama, TASK), tmp_path / "past", TASK)[0]
    assert np.ptp([ll for ll, _ in reference]) > 1.0  # documents the comparison can tell apart
    for artifact in (TorchModel(bos_llama, TASK), exported, with_past):
        model = runner_lm(make_runner(artifact, "x", threads=2), tokenizer, 256, batch_size=3)
        got = model.loglikelihood(_requests(task_dir), disable_tqdm=True)
        np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in reference], rtol=1e-4, atol=1e-4)
        assert [g for _, g in got] == [g for _, g in reference], artifact


def test_both_scorers_give_the_same_task_metrics(bos_llama, task_dir):
    tokenizer = load_tokenizer(bos_llama)
    torch_runner = make_runner(TorchModel(bos_llama, TASK), "torch", threads=2)
    settings = dict(num_fewshot=None, limit=15, batch_size=4, apply_chat_template=False, max_length=256)
    by_hf = score(torch_runner, tokenizer, LOCAL, task_dir, **settings)
    by_runner = score(type("Plain", (), {"__call__": lambda self, feed: torch_runner(feed), "fixed_shape": (None, None),
                                          "name": "plain", "backend": "torch-cpu"})(), tokenizer, LOCAL, task_dir,
                      **settings)
    assert set(by_hf.metrics) == {"compress_next_word/acc", "compress_next_word/perplexity",
                                  "compress_sentence_ending/acc", "compress_sentence_ending/acc_norm"}
    assert by_hf.documents == {NEXT_WORD: 15, SENTENCE_ENDING: 15}
    for name, value in by_hf.metrics.items():
        assert by_runner.metrics[name] == pytest.approx(value, rel=1e-4), name
    assert by_hf.stderr["compress_sentence_ending/acc"] > 0
    assert by_hf.higher_is_better["compress_next_word/perplexity"] is False


def test_collect_names_metrics_per_task_and_filter():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 0.25,
                                 "exact_match_stderr,strict": "N/A"}},
               "higher_is_better": {"t": {"acc": True, "exact_match": True}}, "n-samples": {"t": {"effective": 8}}}
    scores = collect(results)
    assert scores.metrics == {"t/acc": 0.5, "t/exact_match,strict": 0.25}
    assert scores.stderr == {"t/acc": 0.1} and scores.documents == {"t": 8}


def test_greedy_generation_recomputing_matches_the_kv_cache_path(bos_llama, tmp_path):
    tokenizer = load_tokenizer(bos_llama)
    plain = run_stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), TorchModel(bos_llama, TASK),
                      tmp_path / "plain", TASK)[0]
    prompt = [2, 9, 10, 11, 12, 13, 14]
    cached = greedy_tokens(make_runner(TorchModel(bos_llama, TASK), "t", threads=2), prompt, 8)
    recomputed = greedy_tokens(make_runner(plain, "o", threads=2), prompt, 8)
    assert cached == recomputed and len(cached) == 8
    texts = ["the film was good and the plot was funny but the cast was dull"] * 3
    ids = prompts(tokenizer, texts, 3, 6, chat=False)
    assert ids[0][0] == 2 and len(ids[0]) == 7
    reference = generate(make_runner(TorchModel(bos_llama, TASK), "t", threads=2), tokenizer, ids, 8)
    assert reference.metrics() == {"generation_exact_match": 1.0, "generation_prefix_tokens": 8.0}


def test_prompts_of_one_length_decode_together_as_each_would_alone(bos_llama, monkeypatch):
    runner = make_runner(TorchModel(bos_llama, TASK), "t", threads=2)
    ids = [[2, 9, 10, 11], [2, 30, 31, 32], [2, 9, 10, 11, 12, 13], [2, 40, 41, 42]]
    alone = [greedy_tokens(runner, prompt, 10) for prompt in ids]
    assert len({tuple(tokens) for tokens in alone}) > 1  # the prompts lead to different generations
    eos = next(token for token in alone[1] if token not in alone[0])  # ends the second prompt's row only
    expected = [greedy_tokens(runner, prompt, 10, stop=lambda tokens: tokens[-1] == eos) for prompt in ids]
    assert len(expected[1]) < 10 and len(expected[0]) == 10
    monkeypatch.setattr("compressor.generation_fidelity.greedy_tokens", None)  # only the batched path may run
    assert generate(runner, SimpleNamespace(eos_token_id=eos), ids, 10).tokens == expected


def test_fidelity_metrics_count_exact_generations_and_matching_prefixes():
    base = Generations([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]])
    other = Generations([[1, 2, 3, 4], [5, 6, 0, 8], [1, 9]])
    assert other.metrics(base) == {"generation_exact_match": pytest.approx(1 / 3),
                                   "generation_prefix_tokens": pytest.approx((4 + 2 + 0) / 3)}
    assert base.metrics() == {"generation_exact_match": 1.0, "generation_prefix_tokens": pytest.approx(10 / 3)}


def _recipe(data, stages, goals, lm_eval="", extra=""):
    return f"""name: tiny-tasks
task: text-generation
stages:
{stages}
evaluation:
  data: {{path: "{data}"}}
  max_length: 32
  batch_size: 8
  generation_fidelity: {{prompts: 4, prompt_tokens: 8, new_tokens: 8}}
{lm_eval}{extra}
benchmark: {{seq_len: 32, iterations: 4, warmup: 1, memory: false}}
goals:
  accuracy:
{goals}
"""


LM_EVAL = """  lm_eval:
    tasks: [compress_next_word, compress_sentence_ending]
    limit: 40
    batch_size: 8
    data: {{path: "{data}"}}
"""
GOALS = """    - {metric: compress_sentence_ending/acc, max_drop: 0.5}
    - {metric: compress_next_word/perplexity, max_drop_pct: 50}
    - {metric: generation_exact_match, min: 0.0}
    - {metric: generation_prefix_tokens, max_drop: 8}"""


@pytest.mark.parametrize("stages", ["  - {type: quantize, scheme: fp8}",
                                    "  - {type: quantize, scheme: int4-weight-only, algorithm: rtn, block_size: 32, "
                                    "embeddings: int8}",
                                    "  - {type: export_onnx, with_past: true}"],
                         ids=["fp8-torch", "int4-int8-table-torch", "onnx-with-past"])
def test_a_run_gates_on_task_metrics_and_generation_fidelity(bos_llama, sentences_text, tmp_path, stages):
    recipe = write_recipe(tmp_path, _recipe(sentences_text, stages, GOALS, LM_EVAL.format(data=sentences_text)))
    result = run(parse_recipe(recipe.read_text(), str(recipe)), bos_llama,
                 RunOptions(out=tmp_path / "run", cache=False))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for side in ("baseline", "result"):
        metrics = report[side]["metrics"]
        assert {"compress_next_word/acc", "compress_sentence_ending/acc_norm", "generation_exact_match",
                "generation_prefix_tokens"} <= set(metrics)
        assert report[side]["metric_stderr"]["compress_sentence_ending/acc"] > 0
    assert report["baseline"]["metrics"]["generation_exact_match"] == 1.0
    rows = {row["goal"]: row for row in report["gate"]}
    ending = rows["accuracy.compress_sentence_ending/acc.max_drop"]
    assert ending["interval"] and ending["significant"] is not None
    assert rows["accuracy.generation_prefix_tokens.max_drop"]["passed"]
    assert any("lm-eval on result" in note for note in report["notes"])
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "compress_sentence_ending/acc | " in markdown and " ± " in markdown
    assert result.report.verdict == "pass"


def test_a_second_run_scores_only_its_result_and_reports_the_same(bos_llama, sentences_text, tmp_path, monkeypatch):
    import compressor.task_scores as task_scores

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, _recipe(sentences_text, "  - {type: quantize, scheme: fp8}", GOALS,
                                            LM_EVAL.format(data=sentences_text)))
    first = run(parse_recipe(recipe.read_text(), str(recipe)), bos_llama, RunOptions(out=tmp_path / "first")).json
    scored, generate_, score_ = [], task_scores.generate, task_scores.score
    monkeypatch.setattr(task_scores, "generate", lambda runner, *a, **k: scored.append(("generate", runner.name))
                        or generate_(runner, *a, **k))
    monkeypatch.setattr(task_scores, "score", lambda runner, *a, **k: scored.append(("lm-eval", runner.name))
                        or score_(runner, *a, **k))
    again = run(parse_recipe(recipe.read_text(), str(recipe)), bos_llama,
                RunOptions(out=tmp_path / "again", resume=True)).json
    assert scored == [("generate", "result"), ("lm-eval", "result")]  # the baseline's came from the cache
    for side in ("baseline", "result"):
        assert again[side]["metrics"] == first[side]["metrics"]
        assert again[side]["metric_stderr"] == first[side]["metric_stderr"]
    assert any("reused from the stage cache" in note and "generation fidelity and lm-eval scores" in note
               for note in again["notes"])
    assert any("lm-eval on baseline" in note for note in again["notes"])


def test_a_changed_model_loses_generation_fidelity(bos_llama, sentences_text, tmp_path):
    stages = "  - {type: prune, method: magnitude, sparsity: 0.8}"
    recipe = write_recipe(tmp_path, _recipe(sentences_text, stages, "    - {metric: generation_exact_match, min: 1.0}"))
    result = run(parse_recipe(recipe.read_text(), str(recipe)), bos_llama,
                 RunOptions(out=tmp_path / "run", cache=False))
    metrics = result.report.result.metrics
    assert metrics["generation_exact_match"] < 1.0 and metrics["generation_prefix_tokens"] < 8
    assert result.report.verdict == "fail"


@pytest.mark.parametrize("change, message", [
    (("    - {metric: compress_next_word/acc, max_drop: 0.1}", ""), "names lm-eval task 'compress_next_word', which "
                                                                  "evaluation.lm_eval.tasks does not list"),
    (("    - {metric: compress_next_word/bleu_x, max_drop: 0.1}", LM_EVAL), "a goal can use metric acc, perplexity"),
    (("    - {metric: perplexity, max_drop_pct: 5}\n    - {metric: top1_agreement, min: 0.5}",
      "  lm_eval:\n    tasks: [missing-task.yaml]\n"), "lm_eval task file .*missing-task.yaml not found"),
])
def test_recipe_mistakes_are_refused_when_planning(tmp_path, sentences_text, change, message):
    goals, lm_eval = change
    text = _recipe(sentences_text, "  - {type: quantize, scheme: fp8}", goals, lm_eval.format(data=sentences_text))
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(UserError, match=message):
        plan(parse_recipe(recipe.read_text(), str(recipe)))


def test_fidelity_goal_without_generation_fidelity_and_lm_eval_on_a_classifier_are_refused(tmp_path, sentences_text):
    text = _recipe(sentences_text, "  - {type: quantize, scheme: fp8}", "    - {metric: generation_exact_match, min: 1}")
    text = text.replace("  generation_fidelity: {prompts: 4, prompt_tokens: 8, new_tokens: 8}\n", "")
    with pytest.raises(UserError, match="generation_exact_match is measured with evaluation.generation_fidelity"):
        plan(parse_recipe(text, "r.yaml"))
    classifier = text.replace("task: text-generation", "task: text-classification").replace(
        "    - {metric: generation_exact_match, min: 1}", "    - {metric: accuracy, max_drop: 0.1}").replace(
        "  batch_size: 8\n", "  batch_size: 8\n  lm_eval: {tasks: [compress_next_word]}\n")
    with pytest.raises(UserError, match="evaluation.lm_eval applies to text-generation recipes"):
        parse_recipe(classifier, "r.yaml")


def test_an_unknown_task_name_stops_the_run_before_any_stage(bos_llama, sentences_text, tmp_path):
    lm_eval = "  lm_eval:\n    tasks: [compress_next_word, no_such_task_anywhere]\n"
    text = _recipe(sentences_text, "  - {type: quantize, scheme: fp8}", "    - {metric: generation_exact_match, min: 0}",
                   lm_eval)
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: .*no task 'no_such_task_anywhere'"):
        run(parse_recipe(recipe.read_text(), str(recipe)), bos_llama, RunOptions(out=tmp_path / "run", cache=False))
    assert not (tmp_path / "run").exists()
