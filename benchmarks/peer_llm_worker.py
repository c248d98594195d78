"""llm-compressor's side of benchmarks/peer_llm.py; runs in the virtualenv `make peer-llm` creates
(llm-compressor 0.14 pins transformers 5.15-5.17, which compress's own environment cannot share).

It imports nothing from compress. Given the checkpoint, the calibration token windows that compress
cut (a .npy file, so both tools see the same tokens in the same order) and a method, it runs
llm-compressor's `oneshot`, then writes the model as an ordinary Hugging Face folder of float
weights: pruned weights as they are, quantized weights as llm-compressor's own fake-quantization
computes them (what a W4A16 kernel would multiply by). It checks that folder against the
compressed model in memory on two calibration windows and records the largest logit difference,
the wall time of `oneshot` and the process's peak resident memory in `peer.json`.

The 8-bit-activation methods (fp8-dynamic: FP8_DYNAMIC, no data; w8a8-int8: SmoothQuant 0.8 and
GPTQ W8A8) are written differently: float weights would lose the per-token activation quantization,
half of the scheme. Their folder is llm-compressor's own compressed-tensors checkpoint
(`save_pretrained(save_compressed=True)`, with the tokenizer), which transformers loads back with
each Linear quantizing its input on the fly; the check reloads it in this environment too.

Usage: python peer_llm_worker.py --model CKPT --windows calib.npy --method gptq-g128 --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from peer_llm import ACTIVATION_METHODS, peak_rss_mb  # beside this script; it imports nothing from compress at load

DATA_FREE = ("fp8-dynamic",)  # weights rounded, activation scales computed per call: oneshot needs no dataset


def recipe_for(method: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    ignore = ["lm_head"]
    if method == "fp8-dynamic":  # per-channel E4M3 weights by rounding, per-token activations at run time
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)
    if method == "w8a8-int8":  # llm-compressor's int8 W8A8 example: smoothing first, then GPTQ per channel
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    kind, _, variant = method.rpartition("-")
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


def save_compressed(model, args, windows, seconds: float, peak_mb: float) -> None:
    """The 8-bit-activation methods: llm-compressor's compressed-tensors folder, checked by reloading it here."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layers = [name for name, m in model.named_modules()
              if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.input_activations]
    probe = torch.from_numpy(windows[:2])
    with torch.no_grad():  # before saving: saving compresses the model in memory
        expected = model(input_ids=probe).logits
    out = Path(args.out)
    saving = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)  # the 8-bit codes are cast here, after oneshot's clock
    save_seconds = time.perf_counter() - saving
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    # The checkpoint's own config plus the quantization_config just written, for the reason given in main():
    # the same config every other method's folder is read with
    written = json.loads((out / "config.json").read_text())
    config = json.loads((Path(args.model) / "config.json").read_text())
    config["quantization_config"] = written["quantization_config"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=probe).logits
    np.save(out / "probe_logits.npy", expected.numpy())
    (out / "peer.json").write_text(json.dumps({
        "tool": "llm-compressor", "method": args.method, "seconds": seconds, "peak_rss_mb": peak_mb,
        "saved_as": "compressed-tensors", "format": written["quantization_config"].get("format"),
        "save_seconds": save_seconds,
        "reload_max_abs_logit_diff": float((expected - got).abs().max()), "quantized_layers": len(layers)},
        indent=2) + "\n")


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
    if args.method in DATA_FREE:  # oneshot without a dataset: no calibration loader, modifiers applied directly
        oneshot(model=model, recipe=recipe_for(args.method))
    else:
        oneshot(model=model, dataset=dataset, recipe=recipe_for(args.method), num_calibration_samples=len(windows),
                max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    peak_mb = peak_rss_mb()
    if args.method in ACTIVATION_METHODS:
        return save_compressed(model, args, windows, seconds, peak_mb)

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
