"""TensorRT engines and GPU runners, checked without a GPU: precision to builder flags, profiles from the
recipe's shapes, graphs TensorRT cannot parse, engine metadata and the refusal to load it elsewhere,
`compress doctor`, and exit 3 before any heavy work where the backend is missing. The builds and runs
themselves are in test_gpu.py, which skips here."""

import importlib.util
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from compressor.artifacts import EngineModel
from compressor.cli import main
from compressor.engine import (METADATA_FORMAT, check_capability, check_compatible, check_graph, format_parser_errors,
                               precision_plan, read_metadata, write_metadata)
from compressor.errors import BackendMissing, UserError
from compressor.planning import check_device, plan
from compressor.recipe import parse_recipe
from compressor.stages.export.build_engine import ShapeRange, check_profile_covers, default_profile

from .conftest import write_recipe

RECIPE = """\
name: engine
task: text-classification
stages:
  - type: export_onnx
{stages}
evaluation:
  data: {{dataset: sentiment-test}}
  batch_size: 16
  max_length: 256
benchmark: {{batch_size: 4, seq_len: 128}}
goals:
  latency: {{min_speedup: 2.0}}
"""
STATIC = "  - type: quantize\n    scheme: int8-static\n    calibration: {data: {dataset: sentiment-train}}\n"


def engine_recipe(stages: str):
    return parse_recipe(RECIPE.format(stages=stages), "engine.yaml")


def test_profile_from_the_recipe_covers_benchmark_and_evaluation():
    profile = default_profile(benchmark=(4, 128), evaluation=(16, 256))
    assert (profile.min, profile.opt, profile.max) == ((1, 1), (4, 128), (16, 256))
    shapes = {"benchmark": (4, 128), "evaluation": (16, 256)}
    assert check_profile_covers(profile, shapes) is None
    narrow = ShapeRange(min=(1, 1), opt=(4, 128), max=(8, 128))
    assert "evaluation shape [16, 256]" in check_profile_covers(narrow, shapes)
    with pytest.raises(ValueError, match="sequence: need 1 <= min <= opt <= max"):
        ShapeRange(min=(1, 64), opt=(1, 32), max=(1, 128))


def test_an_explicit_profile_that_misses_the_run_shapes_stops_in_plan():
    narrow = "  - type: build_engine\n    profile: {min: [1, 1], opt: [4, 128], max: [8, 128]}"
    with pytest.raises(UserError, match=r"engine.yaml:5: stages\[1\] \(build_engine\): profile .* evaluation shape"):
        plan(engine_recipe(narrow))


@pytest.mark.parametrize("precision, major, strongly_typed, expected", [
    ("fp32", 10, None, (False, [])),
    ("fp16", 10, None, (False, ["FP16"])),
    ("bf16", 10, None, (False, ["BF16"])),
    ("int8", 10, None, (False, ["INT8", "FP16"])),
    ("int8", 10, True, (True, [])),  # Q/DQ nodes carry the types
    ("fp8", 10, None, (True, [])),
    ("fp32", 11, None, (True, [])),
    ("int8", 11, None, (True, [])),
])
def test_precision_maps_to_network_mode_and_builder_flags(precision, major, strongly_typed, expected):
    assert precision_plan(precision, major, strongly_typed) == expected


def test_precision_combinations_tensorrt_cannot_build_are_refused():
    assert precision_plan("int8", 10, None, fp16_fallback=False) == (False, ["INT8"])
    with pytest.raises(UserError, match="strongly typed network takes its types from the ONNX graph"):
        precision_plan("fp16", 11, None)
    with pytest.raises(UserError, match="fp8: FP8 engines are built strongly typed"):
        precision_plan("fp8", 10, False)
    with pytest.raises(UserError, match="TensorRT 11 builds strongly typed networks only"):
        precision_plan("fp32", 11, False)


def test_compute_capability_per_precision():
    assert check_capability("bf16", (8, 0), "A100") is None
    assert "bf16 needs compute capability 8.0" in check_capability("bf16", (7, 5), "T4")
    assert check_capability("fp8", (9, 0), "H100") is None
    expected = "precision fp8 needs compute capability 8.9 or newer; A100 has 8.0"
    assert check_capability("fp8", (8, 0), "A100") == expected


def test_graphs_tensorrt_cannot_take_are_refused_naming_the_stage():
    with pytest.raises(UserError, match=r"MatMulInteger.*quantize int8-dynamic"):
        check_graph(Counter({"MatMulInteger": 6, "MatMul": 2}), "fp16", ["input_ids"])
    with pytest.raises(UserError, match=r"Attention, SkipLayerNormalization.*optimize_onnx"):
        check_graph(Counter({"Attention": 2, "SkipLayerNormalization": 4}), "fp16", ["input_ids"])
    with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear pairs"):
        check_graph(Counter({"MatMul": 6}), "int8", ["input_ids", "attention_mask"])
    with pytest.raises(UserError, match="export without with_past"):
        check_graph(Counter({"MatMul": 6}), "fp16", ["input_ids", "past_key_values.0.key"])
    check_graph(Counter({"QuantizeLinear": 6, "DequantizeLinear": 12, "MatMul": 6}), "int8",
                ["input_ids", "attention_mask", "token_type_ids"])


@pytest.mark.parametrize("stages, message", [
    ("  - type: optimize_onnx\n  - type: build_engine", "optimize_onnx.*ONNX Runtime-only fused operators"),
    ("  - type: quantize\n    scheme: int8-dynamic\n  - type: build_engine", "int8-dynamic.*use int8-static"),
    ("  - type: build_engine\n    precision: int8", "precision int8 needs an explicitly quantized"),
    ("  - type: build_engine\n  - type: quantize\n    scheme: int8-dynamic", "outputs an engine model"),
])
def test_plan_refuses_engine_recipes_that_cannot_work(stages, message):
    with pytest.raises(UserError, match=message) as caught:
        plan(engine_recipe(stages))
    assert caught.value.exit_code == 2


def test_missing_tensorrt_is_exit_3_in_plan():
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here; the missing-backend path cannot be shown")
    with pytest.raises(BackendMissing, match="'tensorrt'") as caught:
        plan(engine_recipe(STATIC + "  - type: build_engine\n    precision: int8"))
    assert caught.value.exit_code == 3


def test_cli_stops_with_exit_3_before_loading_anything(tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.format(stages="  - type: build_engine"))
    # The checkpoint does not even exist: plan() must stop first.
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tmp_path / "nope"), "--device", "cuda"])
    assert outcome.exit_code == 3, outcome.output
    assert "cannot run here" in outcome.output and "checkpoint not found" not in outcome.output


def test_validate_calls_an_engine_recipe_valid_where_it_cannot_run(tmp_path):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip("tensorrt is installed here")
    good = write_recipe(tmp_path, RECIPE.format(stages="  - type: build_engine"), "good.yaml")
    bad = write_recipe(tmp_path, RECIPE.format(stages="  - type: optimize_onnx\n  - type: build_engine"), "bad.yaml")
    outcome = CliRunner().invoke(main, ["validate", str(good)], terminal_width=200)
    assert outcome.exit_code == 0 and "valid; cannot run on this machine" in outcome.output
    assert "'tensorrt'" in outcome.output
    outcome = CliRunner().invoke(main, ["validate", str(good), str(bad)], terminal_width=200)
    assert outcome.exit_code == 2 and "ONNX Runtime-only fused operators" in outcome.output


def test_device_cuda_without_a_gpu_is_exit_3_and_an_engine_on_cpu_exit_2():
    from compressor.doctor import cuda_problem

    if cuda_problem() is None:
        pytest.skip("a CUDA GPU is present")
    steps = plan(engine_recipe(""))
    with pytest.raises(BackendMissing, match="--device cuda: torch .*CPU-only build|sees no GPU") as caught:
        check_device("cuda", "cuda", steps)
    assert caught.value.exit_code == 3
    fake_engine_plan = [SimpleNamespace(output_kind="engine")]
    with pytest.raises(UserError, match="runs on a GPU only; run with --device cuda"):
        check_device("cpu", "cuda", fake_engine_plan)


def test_torch_dtype_needs_cuda(tmp_path):
    recipe = write_recipe(tmp_path, RECIPE.format(stages=""))
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tmp_path), "--torch-dtype", "float16"])
    assert outcome.exit_code == 2 and "--torch-dtype applies to --device cuda only" in outcome.output


class FakeParserError:
    def __init__(self, index, desc, name="", operator=""):
        self._index, self._desc, self._name, self._operator = index, desc, name, operator

    def node(self):
        return self._index

    def desc(self):
        return self._desc

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._operator


def test_parser_errors_name_the_onnx_nodes():
    errors = [FakeParserError(3, "Unsupported operator MatMulInteger", "", "MatMulInteger"),
              FakeParserError(-1, "Invalid graph", "/encoder/layer.0/Add", "Add")]
    text = format_parser_errors(errors, ["a", "b", "c", "/encoder/layer.0/attention/MatMul_q"])
    assert text == ("node /encoder/layer.0/attention/MatMul_q (MatMulInteger): Unsupported operator MatMulInteger; "
                    "node /encoder/layer.0/Add (Add): Invalid graph")


METADATA = {"format": METADATA_FORMAT, "tensorrt": "10.13.0.35", "gpu": {"name": "NVIDIA H100 80GB HBM3",
                                                                          "capability": [9, 0]},
            "precision": "fp16", "strongly_typed": False, "flags": ["FP16"],
            "profiles": [{"input_ids": {"min": [1, 1], "opt": [1, 128], "max": [32, 128]}}],
            "onnx_sha256": "0" * 64, "built": "2026-11-23T12:00:00Z", "build_seconds": 41.0}
H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "memory_gb": 79.1}


def test_engine_metadata_round_trips_and_is_checked_against_the_machine(tmp_path):
    engine = EngineModel(tmp_path / "model.engine", "text-classification")
    engine.path.write_bytes(b"serialized engine")
    write_metadata(engine, METADATA)
    assert read_metadata(engine) == METADATA
    check_compatible(METADATA, "10.13.0.35", H100, engine.path)  # the machine it was built on
    with pytest.raises(UserError, match="built with TensorRT 10.13.0.35, this machine has TensorRT 10.14.1.48; "
                                        "engines do not move between TensorRT versions; rebuild it on this machine"):
        check_compatible(METADATA, "10.14.1.48", H100, engine.path)
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "capability": (8, 0), "memory_gb": 79.2}
    with pytest.raises(UserError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\), this machine "
                                        r"has NVIDIA A100-SXM4-80GB \(8.0\)"):
        check_compatible(METADATA, "10.13.0.35", a100, engine.path)
    h100_pcie = {**H100, "name": "NVIDIA H100 PCIe"}  # same capability, another model: refused too
    with pytest.raises(UserError, match="engines are tuned to one GPU model"):
        check_compatible(METADATA, "10.13.0.35", h100_pcie, engine.path)
    with pytest.raises(BackendMissing, match="needs the tensorrt package"):
        check_compatible(METADATA, None, H100, engine.path)
    with pytest.raises(BackendMissing, match="needs a CUDA GPU"):
        check_compatible(METADATA, "10.13.0.35", None, engine.path)


def test_engines_without_or_with_foreign_metadata_are_refused(tmp_path):
    engine = EngineModel(tmp_path / "model.engine", "text-classification")
    engine.path.write_bytes(b"x")
    with pytest.raises(UserError, match="model.engine.json: missing"):
        read_metadata(engine)
    engine.metadata_path.write_text(json.dumps({**METADATA, "format": 99}))
    with pytest.raises(UserError, match="metadata format 99"):
        read_metadata(engine)
    engine.metadata_path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable engine metadata"):
        read_metadata(engine)


def test_an_engine_result_on_the_cpu_is_refused(tmp_path):
    from compressor.runners import make_runner

    engine = EngineModel(tmp_path / "model.engine", "text-classification")
    with pytest.raises(UserError, match="runs on a GPU only"):
        make_runner(engine, "result")


def test_doctor_lists_every_component_with_a_reason_for_what_is_missing():
    outcome = CliRunner().invoke(main, ["doctor", "--json"])
    assert outcome.exit_code == 0, outcome.output
    rows = {row["component"]: row for row in json.loads(outcome.output)}
    assert set(rows) == {"GPU", "torch CUDA", "ONNX Runtime", "ONNX Runtime cuda provider",
                         "ONNX Runtime tensorrt provider", "TensorRT", "bitsandbytes", "AOTInductor cpu",
                         "AOTInductor cuda", "2:4 sparse kernels"}
    for row in rows.values():
        assert row["usable"] or row["reason"], row  # nothing missing without a why
    assert rows["ONNX Runtime"]["usable"] and "CPUExecutionProvider" in rows["ONNX Runtime"]["detail"]
    if not importlib.util.find_spec("tensorrt"):
        assert not rows["TensorRT"]["usable"] and "pip install tensorrt" in rows["TensorRT"]["reason"]
    table = CliRunner().invoke(main, ["doctor"], terminal_width=160)
    assert table.exit_code == 0 and "TensorRT" in table.output and "bitsandbytes" in table.output


def test_an_ort_provider_that_fails_to_start_is_not_silently_replaced_by_the_cpu(exported):
    """ONNX Runtime falls back to the CPU when a provider cannot load; the runner must say so instead."""
    import onnxruntime as ort

    from compressor.runners import OrtRunner

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(BackendMissing, match="could not start CUDAExecutionProvider"):
        OrtRunner(exported.path, "text-classification", providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


class FakeTensorRT:
    """A stand-in for the tensorrt module with the calls build() makes, recording them. It checks
    compress's side of the conversation (flags, profiles, timing cache, metadata, parser errors),
    not TensorRT: that needs a GPU (tests/test_gpu.py)."""

    __version__ = "10.13.0.35"

    def __init__(self, parse_errors=()):
        fake = self
        self.calls = {"flags": [], "profiles": {}, "network_flags": None, "timing_cache_in": None}
        self.parse_errors = list(parse_errors)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", FP8="FP8")

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            builder_optimization_level = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = (pool, size)

            def set_flag(self, flag):
                fake.calls["flags"].append(flag)

            def add_optimization_profile(self, profile):
                fake.calls["profiles"] = profile.shapes

            def create_timing_cache(self, data):
                fake.calls["timing_cache_in"] = bytes(data)
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache, fake.calls["ignore_mismatch"] = cache, ignore_mismatch

            def get_timing_cache(self):
                return self.cache

        class Network:
            def __init__(self):
                self.names = []

            @property
            def num_inputs(self):
                return len(self.names)

            def get_input(self, index):
                return SimpleNamespace(name=self.names[index])

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx

                graph = onnx.load(path, load_external_data=False).graph
                self.network.names = [i.name for i in graph.input]
                self.num_errors = len(fake.parse_errors)
                return not fake.parse_errors

            def get_error(self, index):
                return fake.parse_errors[index]

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized engine"

        self.Builder, self.OnnxParser = Builder, Parser


@pytest.fixture(scope="module")
def exported(tiny_classifier, tmp_path_factory):
    from compressor.artifacts import TorchModel
    from compressor.stages.base import StageContext
    from compressor.stages.export.export_onnx import ExportOnnx, ExportOnnxConfig

    folder = tmp_path_factory.mktemp("export")
    return ExportOnnx().run(ExportOnnxConfig(type="export_onnx"), TorchModel(tiny_classifier, "text-classification"),
                            StageContext(folder, "text-classification"))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr("compressor.engine.gpu_identity", lambda: H100)


def _build(fake, exported, tmp_path, monkeypatch, **options):
    import sys

    from compressor.engine import build
    from compressor.progress import Silent
    from compressor.stages.export.build_engine import BuildEngineConfig

    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    config = BuildEngineConfig(type="build_engine", **options)
    out = EngineModel(tmp_path / f"model-{len(list(tmp_path.glob('*.engine')))}.engine", "text-classification")
    profile = default_profile((1, 32), (8, 128))
    return out, build(exported, out, config, profile, tmp_path / "timing.cache", Silent())


def test_build_sets_flags_profiles_and_timing_cache_then_stamps_the_engine(exported, tmp_path,
                                                                            monkeypatch, fake_gpu):
    from compressor.artifacts import sha256_file

    fake = FakeTensorRT()
    engine, metadata = _build(fake, exported, tmp_path, monkeypatch, precision="fp16", workspace_mb=512)
    assert fake.calls["flags"] == ["FP16"] and fake.calls["network_flags"] == 0
    assert fake.calls["workspace"] == ("WORKSPACE", 512 << 20) and fake.calls["ignore_mismatch"] is False
    assert fake.calls["profiles"] == {name: ((1, 1), (1, 32), (8, 128))
                                      for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert engine.path.read_bytes() == b"serialized engine"
    assert read_metadata(engine) == metadata
    assert metadata["onnx_sha256"] == sha256_file(exported.path)
    assert metadata["gpu"] == {"name": H100["name"], "capability": [9, 0]} and metadata["tensorrt"] == "10.13.0.35"
    assert metadata["timing_cache"]["reused_bytes"] == 0
    # The next build reads the timing cache the first one wrote.
    assert (tmp_path / "timing.cache").read_bytes() == b"+timings"
    _, again = _build(fake, exported, tmp_path, monkeypatch, precision="fp16")
    assert fake.calls["timing_cache_in"] == b"+timings" and again["timing_cache"]["reused_bytes"] == 8


def test_build_reports_parser_errors_with_node_names(exported, tmp_path, monkeypatch, fake_gpu):
    import onnx

    from compressor.errors import StageFailed

    first_node = onnx.load(str(exported.path)).graph.node[0]
    fake = FakeTensorRT(parse_errors=[FakeParserError(0, "Assertion failed: unsupported", "", first_node.op_type)])
    with pytest.raises(StageFailed, match=f"node {first_node.name} \\({first_node.op_type}\\): Assertion failed"):
        _build(fake, exported, tmp_path, monkeypatch)
    assert not list(tmp_path.glob("*.engine"))


def test_build_checks_the_graph_before_tensorrt_sees_it(exported, tmp_path, monkeypatch, fake_gpu):
    with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear pairs"):
        _build(FakeTensorRT(), exported, tmp_path, monkeypatch, precision="int8")
