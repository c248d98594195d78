"""A Hugging Face checkpoint to ONNX through PyTorch's own exporter, with the input and output names,
axes and folder layout Optimum's exporter used (so ORTModel*.from_pretrained and every stage after
export read it as before):

- inputs `input_ids`, `attention_mask`, and `token_type_ids` when an encoder takes it; with past
  key/values also `past_key_values.{layer}.{key,value}` (batch, kv heads, past length, head dim);
- outputs `logits` (classification, causal LM) or `last_hidden_state` (feature extraction), and
  `present.{layer}.{key,value}` with past;
- dynamic axes `batch_size`, `sequence_length`, `past_sequence_length` (and the mask's
  `total_sequence_length` with past);
- config, tokenizer and generation config beside model.onnx, no weights.

Two exporters:
- `torchscript` (torch.onnx.export(dynamo=False)) traces the model with eager attention. Its graphs
  are the ones Optimum produced, which ONNX Runtime's transformer optimizer fuses into Attention,
  SkipLayerNormalization and BiasGelu, and it exports a small model in a tenth of a second;
- `dynamo` (torch.export, then onnxscript) is PyTorch's default exporter and the one that stays when
  TorchScript goes. ONNX Runtime's optimizer does not recognise its attention subgraphs, so
  optimize_onnx runs onnxscript's ONNX Runtime fusions on its graphs first."""

from __future__ import annotations

import inspect
import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

from ...anatomy import dense_routed_experts
from ...checkpoint import cache_keyword, copy_checkpoint_files, inspect_checkpoint, model_class, returned_cache
from ...errors import UserError
from ...onnx_graph import tidy_external_data

log = logging.getLogger(__name__)

EXPORTER_KEY = "compress.exporter"  # metadata_props entry recording which exporter wrote the graph
MAIN_OUTPUT = {"text-classification": "logits", "feature-extraction": "last_hidden_state",
               "text-generation": "logits"}
# A protobuf file cannot exceed 2 GB; weights go to an external data file above this.
EXTERNAL_DATA_BYTES = 1_800_000_000
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes opset 18 or later whatever is asked
SAMPLE_BATCH, SAMPLE_LENGTH, SAMPLE_PAST = 2, 8, 5


def export_checkpoint(checkpoint: Path, task: str, out_dir: Path, *, exporter: str, opset: int, with_past: bool,
                      trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Write out_dir/model.onnx (and its config and tokenizer files); return what was done."""
    import torch

    inspect_checkpoint(checkpoint, allow_pickle)
    # Eager attention traces to the matmul/softmax pattern ORT's fusions match; torch.export handles sdpa.
    attention = {"attn_implementation": "eager"} if exporter == "torchscript" else {}
    try:
        module = model_class(task).from_pretrained(
            checkpoint, dtype=torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=any(checkpoint.glob("*.safetensors")), **attention).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{checkpoint}: transformers could not load it as a {task} model: {exc}") from None
    forward, args, input_names, output_names, axes = _traceable(module, task, with_past)
    # Mixture-of-experts layers are traced with every expert computed for every token (anatomy.py): the
    # graph is exact, and does E / top-k times the feed-forward work of the routed eager loop.
    # The exporters write large weights as files of their own naming; they go to a scratch folder, and
    # _finish writes model.onnx (and one model.onnx.data) from there.
    scratch = out_dir / ".export"
    scratch.mkdir(exist_ok=True)
    traced = scratch / "model.onnx"
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    opset_used = max(opset, DYNAMO_MIN_OPSET) if exporter == "dynamo" else opset
    try:
        with torch.no_grad(), warnings.catch_warnings(), _forward_replaced(module, forward), \
                dense_routed_experts(module):
            # torch warns that the TorchScript exporter is deprecated: chosen knowingly (see module doc).
            warnings.simplefilter("ignore", DeprecationWarning)
            if exporter == "torchscript":
                torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes={name: dict(sorted(a.items())) for name, a in zip(input_names, axes)})
            else:
                _export_dynamo(module, args, traced, opset_used, input_names, output_names, axes, big)
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many types for unsupported operators and control flow
        raise UserError(f"torch.onnx.export ({exporter}) cannot export {checkpoint} for {task}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    _finish(traced, out_dir / "model.onnx", exporter, big, {name: _output_axes(task, name) for name in output_names})
    shutil.rmtree(scratch)
    copy_checkpoint_files(checkpoint, out_dir)  # config, tokenizer, generation config: not the weights
    return {"exporter": exporter, "opset": opset_used, "inputs": input_names, "outputs": output_names}


def _export_dynamo(module, args, path: Path, opset: int, input_names, output_names, axes, big: bool) -> None:
    import contextlib
    import io

    import torch
    from torch.export import Dim

    dims = {}

    def dim(name):
        return dims.setdefault(name, Dim(name))

    shapes = [{index: dim(name) for index, name in a.items()} for a in axes]
    fixed = len(args) - 1 if isinstance(args[-1], tuple) else len(args)
    dynamic_shapes = tuple(shapes[:fixed]) + ((tuple(shapes[fixed:]),) if fixed < len(args) else ())
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress line per phase
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=big,
                          verbose=False)


def _output_axes(task: str, name: str) -> dict[int, str]:
    if name.startswith("present."):
        return {0: "batch_size", 2: "total_sequence_length"}
    return {0: "batch_size"} if task == "text-classification" else {0: "batch_size", 1: "sequence_length"}


def _finish(traced: Path, path: Path, exporter: str, big: bool, output_axes: dict[str, dict[int, str]]) -> None:
    """Write the traced graph to `path`: the exporter recorded, output axes named as Optimum named them (the
    exporters make up their own names), stale shapes of weights dropped, weights in one external file if big."""
    import onnx

    model = onnx.load(str(traced))
    for output in model.graph.output:
        shape = output.type.tensor_type.shape.dim
        for index, name in output_axes.get(output.name, {}).items():
            if index < len(shape) and not shape[index].HasField("dim_value"):
                shape[index].dim_param = name
    # The dynamo exporter records shapes of initializers in value_info; ORT's quantizer rewrites Gemm to
    # MatMul with transposed weights and then fails shape inference on those stale entries. The other
    # entries stay: onnxscript's fusion rules check the shapes of activations.
    _share_tied_output_head(model)
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = EXPORTER_KEY, exporter
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data")
    if big:
        tidy_external_data(path)


def _share_tied_output_head(model) -> None:
    """A model with tied embeddings reads its output head from the embedding table. The TorchScript exporter
    folds the transpose into a second copy of the table; read the one table through a Transpose instead, as
    the dynamo exporter does: the file is smaller, and weight-only quantizers leave the head float (it shares
    the table with the embedding Gather), as they did on Optimum's exports."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    tables = {node.input[0] for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits}
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        for table in tables:
            if list(inits[table].dims) != list(weight.dims)[::-1] or inits[table].data_type != weight.data_type:
                continue
            if np.array_equal(numpy_helper.to_array(inits[table]).T, numpy_helper.to_array(weight)):
                transposed = f"{table}_transposed"
                # right before the head, after the Gather: ONNX Runtime's int8 quantizer then transposes the
                # int8 table it made for the Gather instead of keeping a float copy for the head
                index = list(model.graph.node).index(node)
                model.graph.node.insert(index, helper.make_node("Transpose", [table], [transposed], perm=[1, 0],
                                                                name=f"{table}_transpose"))
                model.graph.initializer.remove(weight)
                del inits[node.input[1]]
                node.input[1] = transposed
                break


def exporter_of(model_proto) -> str:
    return next((p.value for p in model_proto.metadata_props if p.key == EXPORTER_KEY), "")


def _traceable(module, task: str, with_past: bool):
    """(forward to trace, sample inputs, input names, output names, per-input {axis: name})."""
    import torch

    encoder, decoder, decoder_with_past = _forwards(module)
    config = module.config
    ids = torch.randint(min(5, config.vocab_size - 1), config.vocab_size, (SAMPLE_BATCH, SAMPLE_LENGTH))
    mask = torch.ones(SAMPLE_BATCH, SAMPLE_LENGTH, dtype=torch.long)
    token_axes = {0: "batch_size", 1: "sequence_length"}
    if task != "text-generation":
        takes_types = "token_type_ids" in inspect.signature(module.forward).parameters
        args = (ids, mask) + ((torch.zeros_like(ids),) if takes_types else ())
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])
        return encoder(MAIN_OUTPUT[task]), args, names, [MAIN_OUTPUT[task]], [token_axes] * len(args)
    if not with_past:
        return decoder, (ids, mask), ["input_ids", "attention_mask"], ["logits"], [token_axes] * 2
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past = tuple(torch.randn(SAMPLE_BATCH, kv_heads, SAMPLE_PAST, head_dim) for _ in range(2 * layers))
    mask = torch.ones(SAMPLE_BATCH, SAMPLE_PAST + SAMPLE_LENGTH, dtype=torch.long)
    parts = [f"{layer}.{part}" for layer in range(layers) for part in ("key", "value")]
    axes = [token_axes, {0: "batch_size", 1: "total_sequence_length"}] + \
        [{0: "batch_size", 2: "past_sequence_length"}] * len(past)
    return decoder_with_past, (ids, mask, past), \
        ["input_ids", "attention_mask"] + [f"past_key_values.{p}" for p in parts], \
        ["logits"] + [f"present.{p}" for p in parts], axes


@contextmanager
def _forward_replaced(module, forward):
    """Trace `module` itself with another forward (as Optimum did), so node and weight names carry no wrapper
    prefix: `bert.encoder.layer.0...`, `/bert/encoder/layer.0/...`."""
    module.forward = forward  # an instance attribute shadows the class's method
    try:
        yield module
    finally:
        del module.forward


def _forwards(module):
    """The three traced signatures: flat tensors in, one output (or logits and flat present) out."""
    forward = type(module).forward

    def encoder(output: str):
        def run(input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return getattr(forward(module, input_ids=input_ids, attention_mask=attention_mask, **extra), output)
        return run

    def decoder(input_ids, attention_mask):
        return forward(module, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def decoder_with_past(input_ids, attention_mask, flat_past):
        """Past key/values as flat tensors in and out: neither exporter takes a Cache object."""
        from transformers import DynamicCache

        cache = DynamicCache(config=module.config)
        for layer in range(len(flat_past) // 2):
            cache.update(flat_past[2 * layer], flat_past[2 * layer + 1], layer)
        out = forward(module, input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      **{cache_keyword(module): cache})
        present = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    return encoder, decoder, decoder_with_past
