"""Generation speed, what a serving team asks of a language model: time to first token (the prompt's
forward pass and the first token out of it), then per-token decode latency with the KV cache, and
tokens per second. Greedy decoding of a fixed number of new tokens (no stopping at end-of-text), so
that every side decodes the same count; the baseline and each result are timed in alternating
rounds, one whole generation per side per round.

Runs on torch modules (past_key_values from transformers' cache) and on ONNX models exported with
past key/values (`export_onnx` with `with_past: true`): each step feeds the previous step's
`present.*` outputs back as `past_key_values.*`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .checkpoint import cache_keyword, returned_cache
from .errors import UserError
from .onnx_graph import complete_feed
from .progress import Progress, Silent
from .runners import OrtRunner, Runner, TorchRunner


@dataclass
class GenerationTimes:
    """Per side: time to first token of each round, and the time of every decode step of every round."""

    first_token_ms: list[float]
    step_ms: list[float]

    def summary(self, prompt_tokens: int, new_tokens: int) -> dict:
        step = float(np.median(self.step_ms))
        return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "time_to_first_token_ms": round(float(np.median(self.first_token_ms)), 3),
                "decode_ms_per_token": round(step, 3), "tokens_per_s": round(1000.0 / step, 2),
                "rounds": len(self.first_token_ms)}


class TorchGenerator:
    def __init__(self, runner: TorchRunner):
        self.module, self.device, self._torch = runner.module, runner.device, runner._torch

    def first(self, prompt: np.ndarray):
        torch = self._torch
        ids = torch.from_numpy(prompt).to(self.device)
        with torch.inference_mode():
            out = self.module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (returned_cache(out), ids.shape[1] + 1, token), int(token[0, 0])

    def next(self, state):
        torch = self._torch
        past, length, token = state
        with torch.inference_mode():
            out = self.module(input_ids=token, attention_mask=torch.ones((token.shape[0], length), dtype=torch.long,
                                                                         device=token.device),
                              use_cache=True, **{cache_keyword(self.module): past})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (returned_cache(out), length + 1, token), int(token[0, 0])


class OrtGenerator:
    def __init__(self, runner: OrtRunner):
        self.session = runner.session
        self.inputs = {i.name for i in self.session.get_inputs()}
        if not any(name.startswith("past_key_values") for name in self.inputs):
            raise UserError(f"{runner.name}: generation speed needs an ONNX model exported with past key/values "
                            "(export_onnx with_past: true)")
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, feed: dict):
        values = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        past = {name.replace("present", "past_key_values"): value for name, value in values.items()
                if name.startswith("present")}
        return values["logits"][:, -1].argmax(-1)[:, None].astype(np.int64), past

    def first(self, prompt: np.ndarray):
        feed = complete_feed(self.session.get_inputs(), {"input_ids": prompt, "attention_mask": np.ones_like(prompt)})
        token, past = self._run(feed)
        return (past, prompt.shape[1] + 1, token), int(token[0, 0])

    def next(self, state):
        past, length, token = state
        feed = {"input_ids": token, "attention_mask": np.ones((token.shape[0], length), dtype=np.int64), **past}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.full((token.shape[0], 1), length - 1, dtype=np.int64)
        token, past = self._run({k: v for k, v in feed.items() if k in self.inputs})
        return (past, length + 1, token), int(token[0, 0])


def generator_for(runner: Runner):
    if isinstance(runner, TorchRunner):
        return TorchGenerator(runner)
    if isinstance(runner, OrtRunner):
        return OrtGenerator(runner)
    raise UserError(f"{runner.name}: generation speed is measured for torch and ONNX Runtime models, not "
                    f"{runner.backend}")


def generate_tokens(generator, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy tokens, time to first token (ms) and each further step's time (ms)."""
    started = time.perf_counter()
    state, token = generator.first(prompt)
    first_ms = (time.perf_counter() - started) * 1000
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        started = time.perf_counter()
        state, token = generator.next(state)
        steps.append((time.perf_counter() - started) * 1000)
        tokens.append(token)
    return tokens, first_ms, steps


def time_generation(runners: list[Runner], prompt: np.ndarray, new_tokens: int, rounds: int,
                    progress: Progress = Silent()) -> dict[str, GenerationTimes]:
    """One untimed generation per side, then `rounds` rounds of one generation per side, the order
    reversed every other round."""
    generators = [(runner.name, generator_for(runner)) for runner in runners]
    for _, generator in generators:
        generate_tokens(generator, prompt, min(new_tokens, 4))  # warm-up: allocators, kernels, caches
    times = {name: GenerationTimes([], []) for name, _ in generators}
    for index in progress.track(range(rounds), rounds, "timing generation"):
        for name, generator in generators if index % 2 == 0 else generators[::-1]:
            _, first_ms, steps = generate_tokens(generator, prompt, new_tokens)
            times[name].first_token_ms.append(first_ms)
            times[name].step_ms.extend(steps)
    return times


def prompt_ids(tokenizer, texts: list[str], prompt_tokens: int) -> np.ndarray:
    """A 1 x prompt_tokens prompt of real text (the prefix token first, as the evaluation's windows)."""
    from .data import token_windows

    windows = token_windows(tokenizer, texts, prompt_tokens, 1)
    if len(windows) == 0:
        raise UserError(f"benchmark.generate: the evaluation text holds fewer than {prompt_tokens} tokens")
    return windows[:1]
