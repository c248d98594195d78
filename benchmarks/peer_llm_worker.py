"""llm-compressor's side of benchmarks/peer_llm.py; runs in the virtualenv `make peer-llm` creates
(llm-compressor 0.14 pins transformers 5.15-5.17, which compress's own environment cannot share).

It imports nothing from compress. Given the checkpoint, the calibration token windows that compress
cut (a .npy file, so both tools see the same tokens in the same order) and a method, it runs
llm-compressor's `oneshot`, then writes the model as an ordinary Hugging Face folder of float
weights: pruned weights as they are, quantized weights as llm-compressor's own fake-quantization
computes them (what a W4A16 kernel would multiply by). It checks that folder against the
compressed model in memory on two calibration windows and records the largest logit difference,
the wall time of `oneshot` and the process's peak resident memory in `peer.json`.

Usage: python peer_llm_worker.py --model CKPT --windows calib.npy --method gptq-g128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from peer_llm import peak_rss_mb  # beside this script; it imports nothing from compress at load


def recipe_for(method: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    kind, _, variant = method.rpartition("-")
    ignore = ["lm_head"]
    if kind in ("sparsegpt", "wanda"):
        structure = "2:4" if variant == "2:4" else "0:0"
        modifier = SparseGPTModifier if kind == "sparsegpt" else WandaPruningModifier
        return modifier(sparsity=0.5, mask_structure=structure, targets=[r"re:.*layers\.\d+\..*proj$"],
                        ignore=ignore)
    group = int(variant.removeprefix("g"))
    scheme = {"targets": ["Linear"],
              "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                          "group_size": group}}
    if kind in ("gptq", "gptq-act"):  # gptq: columns in order; gptq-act: activation order, static groups
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore,
                            actorder="static" if kind == "gptq-act" else None)
    if kind == "awq":
        return AWQModifier(config_groups={"group_0": scheme}, ignore=ignore)
    if kind == "rtn":
        return QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)
    raise SystemExit(f"unknown method {method}")


def effective_weights(model) -> dict:
    """Every parameter as the compressed model computes with it: quantized Linear weights through
    compressed-tensors' own fake quantization, everything else unchanged."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    weights = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight"):
                weights[f"{name}.weight"] = forward_quantize(module, module.weight, "weight",
                                                             scheme.weights).detach().clone()
    return weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which
        # raises "Cannot access accelerator device" on a machine without one. Pinning only speeds up
        # transfers, so skip it there; nothing else of the algorithm changes.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    windows = np.load(args.windows)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": np.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe_for(args.method), num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    peak_mb = peak_rss_mb()

    weights = effective_weights(model)
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    state.update(weights)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    probe = torch.from_numpy(windows[:2])
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        got = plain(input_ids=probe).logits
    out = Path(args.out)
    plain.save_pretrained(out, safe_serialization=True)
    # The checkpoint's own config, not the one transformers 5 writes: it renames rope_theta into
    # rope_parameters, which transformers 4.57 (compress's) does not read; it would then evaluate the
    # model with the default RoPE base (10,000 instead of SmolLM2's 100,000).
    shutil.copy(Path(args.model) / "config.json", out / "config.json")
    np.save(out / "probe_logits.npy", expected.numpy())  # the reading side checks its reload against these
    (out / "peer.json").write_text(json.dumps({
        "tool": "llm-compressor", "method": args.method, "seconds": seconds, "peak_rss_mb": peak_mb,
        "reload_max_abs_logit_diff": float((expected - got).abs().max()), "quantized_layers": len(weights),
        "missing_keys": missing, "unexpected_keys": unexpected}, indent=2) + "\n")


if __name__ == "__main__":
    main()
