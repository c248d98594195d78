"""A small Llama-shaped language model trained here, in float, from scratch: the one language model compress can
build whose weights were never on a quantization grid.

SmolLM2 (the shipped LM fixture) is dequantized from a Q4_1 GGUF file, so a 4-bit method that rounds its weights
back onto blocks of 32 finds them nearly where they were, and its 4-bit verdicts look better than they would on
a model trained in float. This model is the check: a byte-level BPE tokenizer and a Llama (grouped-query
attention, SwiGLU, RMSNorm, rotary positions, an untied head) trained for two passes over English Wikipedia text,
seeded, so every build gives the same weights on the same machine.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from typing import Iterable

log = logging.getLogger(__name__)

BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Shape:
    """What is trained: sized so that two passes over the enwiki sample take about five minutes on 2 CPU cores
    (twice the sentiment classifier's fine-tuning), with every width a multiple of 128 (the group sizes of the
    4-bit schemes and FP8 block scales)."""

    vocab_size: int = 2048      # 8192 stayed near the unigram plateau (held-out perplexity 714 after one pass)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048


@dataclass(frozen=True)
class Schedule:
    window: int = 256           # tokens per training sequence: BOS and the next 255 of the text stream
    batch_size: int = 8         # more, smaller steps: 16 per step left the loss on the unigram plateau
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    epochs: int = 2
    max_steps: int = 0          # 0: every window once per epoch
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) learned from `texts`; BOS starts every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=Shape.max_position_embeddings)


def training_windows(tokenizer, texts: list[str], window: int):
    """(windows, window) int64 token ids: the texts' tokens as one stream, each window BOS followed by the next
    `window - 1` tokens (the layout compress evaluates perplexity on)."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    body = window - 1
    count = len(stream) // body
    ids = torch.tensor(stream[:count * body], dtype=torch.int64).view(count, body)
    return torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.int64), ids], 1)


def build_model(shape: Shape, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**asdict(shape), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rms_norm_eps=1e-5, initializer_range=0.02)
    return LlamaForCausalLM(config)


def train(model, windows, schedule: Schedule, progress=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay over shuffled windows; returns the loss of every step."""
    import torch

    rng = random.Random(schedule.seed)
    per_epoch = len(windows) // schedule.batch_size
    steps = schedule.max_steps or per_epoch * schedule.epochs
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=schedule.learning_rate,
                                  betas=(0.9, 0.95))
    warmup = max(1, int(schedule.warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    model.train()
    order: list[int] = []
    for step in range(steps):
        if len(order) < schedule.batch_size:
            order = list(range(len(windows)))
            rng.shuffle(order)
        batch = windows[[order.pop() for _ in range(schedule.batch_size)]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
        elif (step + 1) % 50 == 0:
            log.info("training: step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def held_out_perplexity(model, windows) -> float:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), 8):
            batch = windows[start:start + 8]
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            total, count = total + float(loss) * tokens, count + tokens
    return math.exp(total / count)
