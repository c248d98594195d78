"""lm-evaluation-harness as an evaluation: the baseline and every result scored on the same documents.

A torch model is scored through lm-eval's own Hugging Face class (HFLM); every other artifact (ONNX with
or without past key/values, AOTInductor packages, TensorRT engines) through `RunnerLM`, a small lm-eval
model over compress's runners: log-likelihoods from one forward pass over context + continuation, greedy
generation token by token. The two agree on a float model within float tolerance (tests check it), so a
result scored one way is comparable with a baseline scored the other.

lm-eval is imported lazily: a recipe without `evaluation.lm_eval` never needs it."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .lm_tasks import TaskRef
from .runners import Runner, TorchRunner

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lm-eval==0.4.13' (or compress[lm-eval])"


def harness_problem() -> Optional[str]:
    """Why lm-eval cannot be used here, or None."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return f"evaluation.lm_eval needs lm-evaluation-harness: {INSTALL_HINT}"
    return None


@dataclass
class TaskScores:
    """lm-eval's figures for one side, each metric named `TASK/METRIC` (`TASK/METRIC,FILTER` for a filter
    other than lm-eval's `none`)."""

    metrics: dict[str, float]
    stderr: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _metric_name(task: str, key: str) -> str:
    metric, _, filtered = key.partition(",")
    return f"{task}/{metric}" if filtered in ("", "none") else f"{task}/{metric},{filtered}"


def collect(results: dict) -> TaskScores:
    """lm-eval's results dictionary as flat metrics (stderr apart; 'N/A' and groups' aggregates left out)."""
    scores = TaskScores({})
    directions = results.get("higher_is_better", {})
    for task, values in results.get("results", {}).items():
        if task in results.get("groups", {}):
            continue
        scores.documents[task] = int(results.get("n-samples", {}).get(task, {}).get("effective", 0)) or \
            int(values.get("sample_len", 0))
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric = key.split(",")[0]
            if metric.endswith("_stderr"):
                name = _metric_name(task, key.replace("_stderr,", ",", 1))
                if math.isfinite(value):
                    scores.stderr[name] = float(value)
                continue
            name = _metric_name(task, key)
            scores.metrics[name] = float(value)
            direction = directions.get(task, {}).get(metric)
            if direction is not None:
                scores.higher_is_better[name] = bool(direction)
    return scores


def _template_lm():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def runner_lm(runner: Runner, tokenizer, max_length: int, batch_size: int):
    """An lm-eval model over a compress runner (class built on first use: lm-eval is optional)."""
    return _runner_lm_class()(runner, tokenizer, max_length, batch_size)


_CLASS = None


def _runner_lm_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = type("RunnerLM", (_RunnerLMMixin, _template_lm()), {})
    return _CLASS


class _RunnerLMMixin:
    """The lm-eval model interface over `Runner.__call__` (token ids in, logits out). Tokenization follows
    lm-eval's HFLM: the tokenizer's own special tokens (none where the text starts with BOS), BOS (else EOS)
    as the prefix of an empty context, left truncation to the model's length."""

    def __init__(self, runner: Runner, tokenizer, max_length: int, batch_size: int):
        super().__init__()
        self.runner, self.tokenizer = runner, tokenizer
        fixed_batch, fixed_length = runner.fixed_shape
        self.fixed_batch, self.fixed_length = fixed_batch, fixed_length
        self.max_length = fixed_length or max_length
        self.batch_size = fixed_batch or batch_size

    # -- what lm-eval asks of a model ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's own choice, unless the text starts with BOS already
            prefix = self.tokenizer.decode([self.prefix_token_id])
            options = {"add_special_tokens": False} if prefix and string.startswith(prefix) else {}
        else:
            options = {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # Longest first, so that a batch holds similar lengths; the answers go back in request order.
        prepared = []
        for index, (_key, context, continuation) in enumerate(requests):
            whole = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            scored = min(len(continuation), len(whole))
            prepared.append((index, whole, list(continuation)[-scored:] if scored else []))
        order = sorted(prepared, key=lambda item: -len(item[1]))
        answers: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logits = self._logits([inputs for _, inputs, _ in batch])
            for row, (index, inputs, targets) in enumerate(batch):
                if not targets:
                    answers[index] = (0.0, True)
                    continue
                # position p predicts token p + 1: the continuation's tokens are predicted by the last
                # len(targets) input positions (the input drops the continuation's own last token)
                end = len(inputs)
                rows = logits[row, end - len(targets):end].astype(np.float64)
                peak = rows.max(-1, keepdims=True)
                log_probs = rows - peak - np.log(np.exp(rows - peak).sum(-1, keepdims=True))
                target = np.asarray(targets)
                answers[index] = (float(log_probs[np.arange(len(target)), target].sum()),
                                  bool((rows.argmax(-1) == target).all()))
        return [answers[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        totals = []
        for (text,) in [request.args for request in requests]:
            windows = [(None,) + window for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))]
            totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .generation_fidelity import greedy_tokens

        answers = []
        for context, settings in [request.args for request in requests]:
            settings = dict(settings)
            if settings.get("do_sample") or float(settings.get("temperature", 0.0) or 0.0) > 0:
                raise UserError("lm_eval: compress scores generation greedily; this task samples "
                                f"({settings}); use a task with greedy generation")
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(settings.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-(self.max_length - new_tokens):]
            tokens = greedy_tokens(self.runner, prompt, new_tokens, stop=self._stopper(until))
            text = self.tok_decode(tokens)
            for marker in until:
                if marker and marker in text:
                    text = text[:text.index(marker)]
            answers.append(text)
        return answers

    # -- helpers ---------------------------------------------------------------------------------------
    def _stopper(self, until: list[str]):
        eos = self.eot_token_id

        def stop(tokens: list[int]) -> bool:
            if tokens and tokens[-1] == eos:
                return True
            return bool(until) and any(marker and marker in self.tok_decode(tokens) for marker in until)
        return stop

    def _logits(self, sequences: list[list[int]]) -> np.ndarray:
        """Logits of right-padded sequences (padding masked out; a causal model's real positions do not
        see it), in fixed-shape batches for a model exported with fixed axes."""
        real = len(sequences)
        width = self.fixed_length or max(len(s) for s in sequences)
        rows = sequences + [sequences[-1]] * ((self.fixed_batch or real) - real)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, sequence in enumerate(rows):
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        return self.runner({"input_ids": ids, "attention_mask": mask})[:real]


def task_manager(tasks: list[TaskRef], task_dir: Optional[Path]):
    """lm-eval's task index over the local tasks' folder, the task YAMLs' folders and, only when a task is
    named that is neither (indexing lm-eval's own 14,000 tasks takes seconds), lm-eval's own tasks. A task
    it does not know is an error naming it."""
    from lm_eval.tasks import TaskManager

    include = ([str(task_dir)] if task_dir else []) + sorted({str(t.path.parent) for t in tasks if t.path})
    by_name = any(not t.local and t.path is None for t in tasks)
    manager = TaskManager(include_path=include or None, include_defaults=by_name)
    missing = [t.name for t in tasks if t.name not in manager.all_tasks and not (t.local and task_dir is None)]
    if missing:
        raise UserError(f"evaluation.lm_eval.tasks: no task {', '.join(map(repr, missing))} in lm-eval "
                        f"{_version()} here (it knows {len(manager.all_tasks)}; `lm-eval ls tasks` lists them) "
                        "nor among compress's local tasks (compress_next_word, compress_sentence_ending)")
    return manager


def _quiet_harness() -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def score(runner: Runner, tokenizer, tasks: list[TaskRef], task_dir: Optional[Path], *, num_fewshot: Optional[int],
          limit: Optional[int], batch_size: int, apply_chat_template: bool, max_length: int,
          seed: int = 1234) -> TaskScores:
    """One side scored by lm-eval on `tasks` (the same documents for every side: lm-eval's order, seeded
    few-shot draws, the first `limit` documents)."""
    from lm_eval import simple_evaluate

    _quiet_harness()
    manager = task_manager(tasks, task_dir)
    if isinstance(runner, TorchRunner):
        from lm_eval.models.huggingface import HFLM

        # HFLM ties input and output embeddings of the model it is given; compress's models are already as
        # they run (a quantized embedding table holds codes, not a `weight`), so tying is skipped for it
        module = runner.module
        module.tie_weights = lambda *args, **kwargs: None
        try:
            model = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=batch_size, device=runner.device,
                         max_length=max_length)
        finally:
            del module.tie_weights
    else:
        model = runner_lm(runner, tokenizer, max_length, batch_size)
    started = time.perf_counter()
    try:
        results = simple_evaluate(model=model, tasks=[t.name for t in tasks], task_manager=manager,
                                  num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                  apply_chat_template=apply_chat_template, log_samples=False,
                                  bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    except UserError:
        raise
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        raise UserError(f"lm_eval: a task's data could not be read ({exc}); a task whose data lives on a hub "
                        "needs it in the local datasets cache (HF_DATASETS_OFFLINE=1 reads only that) or a "
                        "network") from None
    scores = collect(results)
    scores.seconds = time.perf_counter() - started
    return scores


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")
