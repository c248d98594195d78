"""GPU speed of a Llama-shaped model of about 1.1B parameters with random weights (built from a config, no
download): prefill latency (1 x 512 tokens) and decode tokens/s with the KV cache (batch 1 and 16, 128 new
tokens after a 128-token prompt) for torch float32, bfloat16, float16, bfloat16 decoding through
torch.compile with a static cache and CUDA graphs, bfloat16 with 2:4 semi-structured sparse kernels
(magnitude 2:4 on every linear layer but lm_head; compress's sparse_kernels), FP8 (compress's `fp8` layers:
E4M3 weights per channel and activations per token, torch._scaled_mm on compute capability 8.9+, bfloat16
elsewhere; with its top-1 agreement with bfloat16 on the prompt, a check that the kernel computes the same
function), and an AOTInductor bfloat16 package compiled by compress's export_aoti (prefill only: the package
computes logits without a cache).

Decode is memory-bound: each step reads every weight once, so the bandwidth efficiency of a variant is
weight bytes read per step / step time / the GPU's peak bandwidth (4.8e12 B/s on an H200; KV-cache reads,
small at these lengths, are left out, which understates it slightly). gpt-fast reaches about 0.69 of peak;
the target for the best result here is 0.6.

Random weights: speed only; outputs mean nothing. Each variant runs inside its own try: a failure is
recorded with its error and the next one runs; the JSON (--out) is rewritten after every variant, so a
run killed at its time limit keeps what it measured. --budget-s skips variants that would not finish.

Usage: python benchmarks/gpu.py --out gpu.json [--budget-s 240] [--variants bf16,bf16-compiled]
       python benchmarks/gpu.py --smoke --out smoke.json   (tiny shape on the CPU, float32 / bfloat16, < 1 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H200_BYTES_PER_S = 4.8e12
SHAPES = {
    # ~1.10B parameters: TinyLlama's attention (32 heads, 8 KV heads) with a wider FFN, 16 layers, untied head
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False),
}
# In order of what the check must not miss when time runs short: bf16 eager and compiled (the bandwidth
# target), 2:4 kernels, then the other dtypes; the AOTInductor compile of the 1.1B model comes last.
VARIANTS = ("bf16", "bf16-compiled", "bf16-2:4", "fp8", "fp16", "fp32", "aoti-bf16")
SMOKE_VARIANTS = ("fp32", "bf16", "bf16-static", "fp8")
# Seconds a variant needs at least (its compile included): one that would not fit the budget is skipped.
NEEDS_S = {"fp32": 20, "bf16": 15, "fp16": 15, "bf16-compiled": 90, "bf16-2:4": 30, "fp8": 25, "aoti-bf16": 150,
           "bf16-static": 5}


def build_model(shape: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    return model.eval()


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: all parameters but the input embedding table, of which it
    reads one row per token (an untied head is read whole)."""
    embedding = model.get_input_embeddings().weight
    # buffers too: 8-bit layers keep their codes and scales there
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return total - embedding.numel() * embedding.element_size()


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones, the GPU drained around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def prefill_ms(model, device: str, length: int, vocab: int, repeats: int) -> float:
    import torch

    ids = torch.randint(0, vocab, (1, length), device=device)
    with torch.inference_mode():
        return round(median(timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)), 3)


def decode_dynamic(model, device: str, batch: int, prompt: int, new_tokens: int, vocab: int
                   ) -> tuple[float, list[int]]:
    """(milliseconds per decode step, the first row's tokens), eager, with transformers' dynamic cache."""
    import torch

    from compressor.checkpoint import cache_keyword, returned_cache

    keyword = cache_keyword(model)
    ids = prompt_ids(batch, prompt, vocab, device)
    tokens = []

    def generate():
        tokens.clear()
        out = model(input_ids=ids, use_cache=True)
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            tokens.append(token[0, 0])
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return (time.perf_counter() - start) * 1000 / new_tokens

    with torch.inference_mode():
        generate()  # warm-up: kernels chosen, allocator filled
        return round(median([generate() for _ in range(2)]), 4), [int(t) for t in tokens]


def decode_static(model, device: str, batch: int, prompt: int, new_tokens: int, vocab: int, compiled: bool
                  ) -> tuple[float, list[int]]:
    """(milliseconds per decode step, the first row's tokens) with a static cache; `compiled`: the step through
    torch.compile with CUDA graphs (mode reduce-overhead), as gpt-fast decodes."""
    import inspect

    import torch
    from transformers import StaticCache

    from compressor.checkpoint import cache_keyword

    keyword = cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens + 8)
    with_cache_position = "cache_position" in inspect.signature(model.model.forward).parameters  # older releases

    def forward(ids, positions):
        extra = {"cache_position": positions[0]} if with_cache_position else {}
        logits = model(input_ids=ids, position_ids=positions, use_cache=True, **{keyword: cache}, **extra).logits
        return logits[:, -1:].argmax(-1)

    step = torch.compile(forward, mode="reduce-overhead", fullgraph=True) if compiled else forward
    ids = prompt_ids(batch, prompt, vocab, device)
    tokens = []

    def generate():
        tokens.clear()
        cache.reset()
        token = forward(ids, torch.arange(prompt, device=device)[None].expand(batch, -1))
        synchronize(device)
        start = time.perf_counter()
        for index in range(new_tokens):
            tokens.append(token[0, 0])
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            position = torch.full((batch, 1), prompt + index, device=device, dtype=torch.long)
            token = step(token, position).clone()  # a CUDA graph's output is overwritten by its next replay
        synchronize(device)
        return (time.perf_counter() - start) * 1000 / new_tokens

    with torch.inference_mode():
        generate()  # compiles and records the graphs
        generate()
        return round(median([generate() for _ in range(3)]), 4), [int(t) for t in tokens]


def prompt_ids(batch: int, length: int, vocab: int, device: str):
    """The same prompt for every variant (seeded), so that greedy tokens can be compared between them."""
    import torch

    generator = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def prune_2_4_and_swap(model) -> tuple[int, str]:
    """Magnitude 2:4 on every linear layer but lm_head, then the semi-structured kernels; returns the layers."""
    import torch

    from compressor.sparse_kernels import to_semi_structured_
    from compressor.sparsity import nm_mask
    from compressor.stages.prune.sparsify import kernel_layers

    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and name != "lm_head":
                layer.weight[nm_mask(layer.weight.abs().float(), 2, 4)] = 0
    layers, _, _ = kernel_layers(model, "auto")
    return len(layers), to_semi_structured_(model, layers)


def fp8_swap(model, device: str, vocab: int) -> dict:
    """compress's fp8 layers (channel weights, token activations) in place of every linear layer but lm_head;
    returns the layer count, whether the scaled-matmul kernel runs them, and top-1 agreement with before."""
    import torch

    from compressor.torch_transforms import swap_modules
    from compressor.w8a8_layers import quantize_weight, scaled_mm_available, w8a8_linear_class

    linear = w8a8_linear_class()
    names = [name for name, layer in model.named_modules() if isinstance(layer, torch.nn.Linear) and name != "lm_head"]
    ids = prompt_ids(1, 128, vocab, device)
    with torch.inference_mode():
        before = model(ids).logits.argmax(-1)

    def build(old):
        codes, scale = quantize_weight(old.weight, "fp8", "channel")
        return linear.from_codes(old, codes, scale, "fp8", "channel", "token").to(device)
    with torch.no_grad():
        swap_modules(model, names, build)
    first = model.get_submodule(names[0])
    probe = torch.zeros(1, first.in_features, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        after = model(ids).logits.argmax(-1)
    return {"fp8_layers": len(names),
            "kernel": "torch._scaled_mm" if scaled_mm_available(probe, "fp8", "channel", "token", first.weight_q.shape)
            else "simulated (dequantized matmul)",
            "top1_agreement_with_bf16": round(float((before == after).float().mean()), 4)}


def aoti_prefill(model, device: str, length: int, vocab: int, repeats: int, workdir: Path) -> dict:
    """compress's export_aoti on the bf16 model at a static 1 x length, then the package timed as loaded."""
    import torch

    from compressor.artifacts import AotiModel
    from compressor.stages import StageContext
    from compressor.stages.export.export_aoti import ExportAotiConfig, compile_package

    config = ExportAotiConfig(type="export_aoti", device=device, dtype="bfloat16",
                              static_axes={"batch_size": 1, "sequence_length": length})
    package = AotiModel(workdir / "model.pt2", "text-generation")
    metadata = compile_package(model, "text-generation", config, package, StageContext(workdir, "text-generation"))
    loaded = torch._inductor.aoti_load_package(str(package.path))
    ids = torch.randint(0, vocab, (1, length), device=device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        times = timed(lambda: loaded(ids, mask), device, repeats)
    return {"prefill_ms": round(median(times), 3), "compile_seconds": metadata["compile_seconds"],
            "export_seconds": metadata["export_seconds"], "package_mb": round(package.size_mb(), 1)}


def run_variant(name: str, base, settings: dict) -> dict:
    import torch

    device, vocab = settings["device"], settings["vocab"]
    prompt, new_tokens, batches = settings["prompt"], settings["new_tokens"], settings["batches"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(name, torch.bfloat16)
    model = copy.deepcopy(base).to(dtype) if dtype != torch.float32 else base
    result: dict = {"dtype": str(dtype).removeprefix("torch."), "weight_bytes_per_step": weight_bytes_per_step(model)}
    if name == "aoti-bf16":
        with tempfile.TemporaryDirectory() as folder:
            result.update(aoti_prefill(model, device, settings["prefill"], vocab, settings["repeats"], Path(folder)))
        return result
    if name == "bf16-2:4":
        result["sparse_layers"], result["kernel"] = prune_2_4_and_swap(model)
    if name == "fp8":
        result.update(fp8_swap(model, device, vocab))
        result["weight_bytes_per_step"] = weight_bytes_per_step(model)
    result["prefill_ms"] = prefill_ms(model, device, settings["prefill"], vocab, settings["repeats"])
    for batch in batches:
        if name in ("bf16-compiled", "bf16-static"):
            step, tokens = decode_static(model, device, batch, prompt, new_tokens, vocab,
                                         compiled=name == "bf16-compiled")
            if batch == batches[0]:  # the static-cache loop decodes what the eager one does (greedy, same prompt)
                eager = decode_dynamic(model, device, batch, prompt, new_tokens, vocab)[1]
                result["same_tokens_as_eager"] = sum(a == b for a, b in zip(tokens, eager)) / len(eager)
        else:
            step = decode_dynamic(model, device, batch, prompt, new_tokens, vocab)[0]
        result[f"decode_ms_per_step_b{batch}"] = step
        result[f"decode_tokens_per_s_b{batch}"] = round(batch * 1000 / step, 1)
        if settings["peak_bytes_per_s"]:  # a GPU's figure; meaningless for the CPU smoke run
            result[f"bandwidth_efficiency_b{batch}"] = round(result["weight_bytes_per_step"] / (step / 1000)
                                                             / settings["peak_bytes_per_s"], 3)
    return result


def environment(device: str) -> dict:
    import torch
    import transformers

    facts = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
             "device": device}
    if device == "cuda":
        facts.update({"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                      "capability": list(torch.cuda.get_device_capability(0))})
    return facts


def table(results: dict, batches: list[int]) -> str:
    columns = ["prefill_ms"] + [f"decode_tokens_per_s_b{b}" for b in batches] + [f"bandwidth_efficiency_b{batches[0]}"]
    lines = [f"{'variant':<15}" + "".join(f"{c:>28}" for c in columns)]
    for name, result in results.items():
        if "error" in result or "skipped" in result:
            lines.append(f"{name:<15}  {result.get('error') or 'skipped: ' + result['skipped']}"[:200])
            continue
        lines.append(f"{name:<15}" + "".join(f"{result.get(c, '-')!s:>28}" for c in columns))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file written after every variant")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, float32 / bfloat16 only")
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=240, help="skip variants that would end after this")
    arguments = parser.parse_args()
    import torch

    started = time.perf_counter()
    smoke = arguments.smoke
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke on a CPU", file=sys.stderr)
        return 3
    shape = SHAPES["smoke" if smoke else "1b"]
    settings = {"device": device, "vocab": shape["vocab_size"], "prefill": 32 if smoke else 512,
                "prompt": 16 if smoke else 128, "new_tokens": 8 if smoke else 128,
                "batches": [1, 4] if smoke else [1, 16], "repeats": 3 if smoke else 10,
                "peak_bytes_per_s": None if smoke else H200_BYTES_PER_S}
    wanted = [v for v in arguments.variants.split(",") if v] or list(SMOKE_VARIANTS if smoke else VARIANTS)
    base = build_model(shape, device)
    parameters = sum(p.numel() for p in base.parameters())
    record = {"shape": shape, "parameters": parameters, "settings": settings, "environment": environment(device),
              "variants": {}}
    for name in wanted:
        left = arguments.budget_s - (time.perf_counter() - started)
        if left < NEEDS_S.get(name, 30):
            record["variants"][name] = {"skipped": f"{left:.0f} s of the budget left, needs ~{NEEDS_S.get(name)} s"}
        else:
            variant_started = time.perf_counter()
            try:
                record["variants"][name] = run_variant(name, base, settings)
            except Exception as exc:  # one variant's failure (compile, kernels, memory) must not stop the others
                message = str(exc).splitlines()[0] if str(exc) else ""
                record["variants"][name] = {"error": f"{type(exc).__name__}: {message}",
                                            "traceback": traceback.format_exc(limit=6)}
            record["variants"][name]["seconds"] = round(time.perf_counter() - variant_started, 1)
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {json.dumps(record['variants'][name])[:400]}", flush=True)
        _summarise(record)
        arguments.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{shape['num_hidden_layers']} layers, {parameters / 1e9:.3f}B parameters on {device}")
    print(table(record["variants"], settings["batches"]))
    print(f"best bandwidth efficiency (batch 1): {record['best_bandwidth_efficiency_b1']} "
          f"({record['best_variant']}); target 0.6, gpt-fast ~0.69")
    return 0


def _summarise(record: dict) -> None:
    efficiencies = {name: r["bandwidth_efficiency_b1"] for name, r in record["variants"].items()
                    if isinstance(r.get("bandwidth_efficiency_b1"), float)}
    best = max(efficiencies, key=efficiencies.get) if efficiencies else None
    record["best_variant"], record["best_bandwidth_efficiency_b1"] = best, efficiencies.get(best)
    record["meets_target_0_6"] = bool(best) and efficiencies[best] >= 0.6


if __name__ == "__main__":
    sys.exit(main())
