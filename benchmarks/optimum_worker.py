"""Optimum's exporter and quantizer, run in their own virtualenv (`make peer-optimum`): optimum-onnx
0.1.0 needs transformers < 4.58, and compress runs on transformers 5. The benchmarks call this file
with that virtualenv's python and read back the ONNX files it writes.

  export CHECKPOINT TASK OUT [--with-past] [--opset 18]
  quantize-dynamic EXPORTED_DIR OUT                      AutoQuantizationConfig.avx512_vnni(dynamic, per channel)
  quantize-static EXPORTED_DIR OUT --texts FILE          the same, static, minmax-calibrated on FILE's lines
  load EXPORTED_DIR TASK                                 ORTModel*.from_pretrained, one forward pass

Prints one JSON line with what it did (seconds, paths, versions)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ORT_MODEL = {"text-classification": "ORTModelForSequenceClassification",
             "feature-extraction": "ORTModelForFeatureExtraction", "text-generation": "ORTModelForCausalLM"}


def export(args) -> dict:
    from optimum.exporters.onnx import main_export

    task = args.task + ("-with-past" if args.with_past else "")
    started = time.perf_counter()
    main_export(args.source, output=args.out, task=task, opset=args.opset, do_validation=False,
                library_name="transformers")
    return {"seconds": time.perf_counter() - started, "model": str(Path(args.out) / "model.onnx")}


def quantize(args, static: bool) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig, AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(args.source, file_name="model.onnx")
    config = AutoQuantizationConfig.avx512_vnni(is_static=static, per_channel=True)
    ranges = None
    if static:
        from datasets import Dataset
        from transformers import AutoTokenizer

        texts = Path(args.texts).read_text().splitlines()
        tokenizer = AutoTokenizer.from_pretrained(args.source)
        dataset = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=128)))
        ranges = quantizer.fit(dataset=dataset, calibration_config=AutoCalibrationConfig.minmax(dataset),
                               operators_to_quantize=config.operators_to_quantize, batch_size=1,
                               onnx_augmented_model_name=Path(args.out) / "augmented.onnx")
    started = time.perf_counter()
    folder = quantizer.quantize(quantization_config=config, save_dir=args.out, calibration_tensors_range=ranges)
    return {"seconds": time.perf_counter() - started, "model": str(Path(folder) / "model_quantized.onnx")}


def load(args) -> dict:
    import numpy as np
    import optimum.onnxruntime as ort_models
    from transformers import AutoTokenizer

    import onnx

    inputs = onnx.load(str(Path(args.source) / "model.onnx"), load_external_data=False).graph.input
    with_past = any(i.name.startswith("past_key_values") for i in inputs)
    options = {"use_cache": with_past} if args.task == "text-generation" else {}
    model = getattr(ort_models, ORT_MODEL[args.task]).from_pretrained(args.source, **options)
    tokenizer = AutoTokenizer.from_pretrained(args.source)
    feed = tokenizer(["The film is a quiet triumph."], return_tensors="pt")
    if args.task == "text-generation":
        out = model.generate(**feed, max_new_tokens=4, do_sample=False, **options)
        return {"class": type(model).__name__, "with_past": with_past, "generated": out[0].tolist()}
    out = model(**feed)
    first = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return {"class": type(model).__name__, "output_shape": list(np.asarray(first).shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["export", "quantize-dynamic", "quantize-static", "load"])
    parser.add_argument("source")
    parser.add_argument("task_or_out", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--with-past", action="store_true")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--texts")
    args = parser.parse_args()
    if args.command == "export":
        args.task = args.task_or_out
        done = export(args)
    elif args.command == "load":
        args.task = args.task_or_out
        done = load(args)
    else:
        args.out = args.task_or_out
        done = quantize(args, static=args.command == "quantize-static")
    import optimum.version
    import transformers

    done["versions"] = {"optimum-onnx": _version("optimum-onnx"), "optimum": optimum.version.__version__,
                        "transformers": transformers.__version__}
    print(json.dumps(done))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
