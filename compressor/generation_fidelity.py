"""Generation fidelity: greedy generations from the same prompts on the baseline and on a result, compared
token by token. What a chat user sees is the generated text, and a model can keep its per-position top-1
agreement while what it generates drifts after the first differing token; this measures that directly.

Metrics (both sides: the baseline's own figures are the ceiling):
- generation_exact_match: share of prompts whose generation equals the baseline's, token for token;
- generation_prefix_tokens: mean length, in tokens, of the part of each generation that equals the
  baseline's from its start (the baseline's value: its mean generation length).

Generation stops after `new_tokens` or at the end-of-text token. A model that decodes with a KV cache
(torch, ONNX exported with past) is run step by step with it, the prompts of one length together in a
batch; any other runner (ONNX without past, AOTInductor, TensorRT) recomputes the whole sequence for
each new token, one prompt at a time, which gives the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .data import prefix_token
from .errors import UserError
from .generation import generator_for
from .progress import Progress, Silent
from .runners import Runner


@dataclass
class Generations:
    tokens: list[list[int]]

    def metrics(self, reference: Optional["Generations"] = None) -> dict[str, float]:
        if reference is None:
            return {"generation_exact_match": 1.0,
                    "generation_prefix_tokens": float(np.mean([len(t) for t in self.tokens]))}
        exact = [mine == theirs for mine, theirs in zip(self.tokens, reference.tokens)]
        prefixes = [_common_prefix(mine, theirs) for mine, theirs in zip(self.tokens, reference.tokens)]
        return {"generation_exact_match": float(np.mean(exact)), "generation_prefix_tokens": float(np.mean(prefixes))}


def _common_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def uses_chat_template(tokenizer, requested: Optional[bool]) -> bool:
    has_one = bool(getattr(tokenizer, "chat_template", None))
    if requested and not has_one:
        raise UserError("evaluation.generation_fidelity.chat_template: true, but the tokenizer has no chat template")
    return has_one if requested is None else requested


def prompts(tokenizer, texts: list[str], count: int, prompt_tokens: int, chat: bool) -> list[list[int]]:
    """`count` prompts from the first texts holding at least `prompt_tokens` tokens: those tokens, after the
    prefix token (as the evaluation's windows), or with a chat template as a user message asking the model
    to go on with the text."""
    found = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_tokens:
            continue
        head = ids[:prompt_tokens]
        if chat:
            message = "Continue this text: " + tokenizer.decode(head, skip_special_tokens=True)
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                     add_generation_prompt=True)
            found.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            found.append([prefix_token(tokenizer)] + head)
        if len(found) == count:
            return found
    raise UserError(f"evaluation.generation_fidelity: {len(found)} of the evaluation texts hold {prompt_tokens} "
                    f"tokens or more, and {count} prompts were asked for; lower prompts or prompt_tokens")


def greedy_tokens(runner: Runner, prompt: list[int], new_tokens: int,
                  stop: Optional[Callable[[list[int]], bool]] = None) -> list[int]:
    """Up to `new_tokens` greedy tokens after `prompt` (fewer when `stop` says so, the last one kept)."""
    try:
        generator = generator_for(runner)
    except UserError:  # no KV cache to decode with: recompute the sequence for each token
        generator = None
    tokens: list[int] = []
    if generator is not None:
        state, token = generator.first(np.asarray([prompt], dtype=np.int64))
        tokens.append(token)
        while len(tokens) < new_tokens and not (stop and stop(tokens)):
            state, token = generator.next(state)
            tokens.append(token)
        return tokens
    while len(tokens) < new_tokens and not (tokens and stop and stop(tokens)):
        tokens.append(_next_token(runner, prompt + tokens))
    return tokens


def _next_token(runner: Runner, sequence: list[int]) -> int:
    fixed_batch, fixed_length = runner.fixed_shape
    if fixed_length:
        sequence = sequence[-fixed_length:]
    width = fixed_length or len(sequence)
    ids = np.zeros((fixed_batch or 1, width), dtype=np.int64)
    mask = np.zeros_like(ids)
    ids[:, :len(sequence)], mask[:, :len(sequence)] = sequence, 1
    logits = runner({"input_ids": ids, "attention_mask": mask})
    return int(logits[0, len(sequence) - 1].argmax())


def _batched_greedy(generator, prompts: list[list[int]], new_tokens: int, eos: Optional[int]) -> list[list[int]]:
    """Greedy tokens for prompts of one length, decoded together: a decode step reads every weight once
    for the whole batch, where one prompt at a time reads them once per prompt (decoding is bound by
    memory bandwidth, so this is several times faster). No padding is needed, so each row computes
    what it would alone. Each row is cut after its end-of-text token; the batch stops when every row
    has one."""
    state, _ = generator.first(np.asarray(prompts, dtype=np.int64))
    columns = [_column(state)]
    while len(columns) < new_tokens and not all(eos in row for row in zip(*columns)):
        state, _ = generator.next(state)
        columns.append(_column(state))
    rows = [list(row) for row in zip(*columns)]
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def _column(state) -> list[int]:
    """The tokens a generator's step chose, one per row (its state ends with them, torch or numpy)."""
    token = state[-1]
    token = token.cpu().numpy() if hasattr(token, "cpu") else np.asarray(token)
    return [int(t) for t in token.reshape(-1)]


def generate(runner: Runner, tokenizer, prompt_ids: list[list[int]], new_tokens: int,
             progress: Progress = Silent()) -> Generations:
    """Greedy generations of every prompt. Where the runner decodes with a KV cache and takes any batch
    size, prompts of the same length are decoded together; otherwise one at a time."""
    eos = tokenizer.eos_token_id
    try:
        generator = generator_for(runner) if runner.fixed_shape[0] is None else None
    except UserError:
        generator = None
    if generator is not None:
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompt_ids):
            by_length.setdefault(len(prompt), []).append(index)
        tokens: list[list[int]] = [[] for _ in prompt_ids]
        for indices in progress.track(list(by_length.values()), len(by_length),
                                      f"generating with {runner.name}, prompts of one length together"):
            for index, row in zip(indices, _batched_greedy(generator, [prompt_ids[i] for i in indices],
                                                           new_tokens, eos)):
                tokens[index] = row
        return Generations(tokens)

    def stop(tokens: list[int]) -> bool:
        return eos is not None and tokens[-1] == eos
    return Generations([greedy_tokens(runner, prompt, new_tokens, stop)
                        for prompt in progress.track(prompt_ids, len(prompt_ids), f"generating with {runner.name}")])
