"""anatomy.py: one view of a model's parts, linearized experts that compute what the fused ones do, and the
coverage a stage reports."""

from __future__ import annotations

import pytest
import torch

from compressor import anatomy
from compressor.errors import UserError
from compressor.gate import check_coverage

from .architectures import build_architecture

IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [2, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40]])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return build_architecture(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe")


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_linearized_experts_compute_the_fused_function_and_fuse_back(moe, tmp_path):
    model = _load(moe)
    with torch.no_grad():
        reference = model(IDS).logits
        parts = anatomy.open_for_compression(model)
        assert [g.name for g in parts.expert_groups] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert "model.layers.0.mlp.experts.3.down_proj" in parts.linears
        assert parts.routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
        assert parts.head == "lm_head" and not parts.head_tied
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-5, rtol=0)
        with anatomy.CalibratingExperts(model, all_experts=True) as experts:
            experts.counting(True)
            calibrating = model(IDS).logits
            record = experts.record(anatomy.MIN_EXPERT_TOKENS)
        # every token through every expert changes what the hooks see, not the output
        torch.testing.assert_close(calibrating, reference, atol=1e-5, rtol=0)
        # 24 tokens, 2 experts each, per layer
        assert all(sum(counts) == 48 for counts in record["routed_tokens_per_expert"].values())
        model.model.layers[0].mlp.experts[1].up_proj.weight.zero_()
        anatomy.restore_layout(model, parts)
        assert anatomy.is_fused_experts(model.model.layers[0].mlp.experts)
        model.save_pretrained(tmp_path / "saved")
        reloaded = _load(tmp_path / "saved")
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)
        intermediate = reloaded.model.layers[0].mlp.experts.down_proj.shape[2]
        assert torch.count_nonzero(reloaded.model.layers[0].mlp.experts.gate_up_proj[1, intermediate:]) == 0


def test_calibrate_all_experts_reaches_every_expert(moe):
    """With all_experts, each expert's layers see every token; without, only those routed to it."""
    model = _load(moe)
    anatomy.open_for_compression(model)
    seen = {}
    experts = model.model.layers[0].mlp.experts
    handles = [experts[i].gate_proj.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].shape[0]))
               for i in range(len(experts))]
    with torch.no_grad():
        for all_experts in (True, False):
            seen.clear()
            with anatomy.CalibratingExperts(model, all_experts):
                model(IDS)
            if all_experts:
                assert seen == {i: 24 for i in range(len(experts))}
            else:
                assert sum(seen.values()) == 48 and all(count < 24 for count in seen.values())
    for handle in handles:
        handle.remove()


def test_an_expert_no_token_reached_is_rounded_without_data(moe, monkeypatch, tmp_path):
    """GPTQ on statistics of zero rows would zero the weights (dead columns): the expert is rounded to nearest."""
    from compressor.stages.blockwise import sequential

    model = _load(moe)
    parts = anatomy.open_for_compression(model)
    layers = parts.select([], [], "test", head=False)
    starved = "model.layers.0.mlp.experts.2.gate_proj"
    original = sequential._block_statistics

    def without_tokens(block, in_block, recorded, kind):
        stats = original(block, in_block, recorded, kind)
        if starved in stats:
            stats[starved] = sequential.LayerInputs(stats[starved].value.shape[0], kind)  # nothing recorded
        return stats
    monkeypatch.setattr(sequential, "_block_statistics", without_tokens)
    given, details = {}, {}
    feeds = [{"input_ids": IDS.numpy(), "attention_mask": torch.ones_like(IDS).numpy()}]
    with torch.no_grad():
        sequential.compress_sequentially(model, layers, feeds, "text-generation", "hessian", "test",
                                         lambda name, layer, stats: given.__setitem__(name, stats), details=details)
    assert given[starved] is None and details["layers_without_calibration_tokens"] == [starved]
    assert all(stats is not None for name, stats in given.items() if name != starved)


def test_gpt_oss_interleaved_experts_with_biases_linearize_and_fuse_back(tmp_path):
    model = _load(build_architecture(tmp_path / "gpt_oss", "gpt_oss"))
    with torch.no_grad():
        reference = model(IDS).logits
        parts = anatomy.open_for_compression(model)
        assert anatomy.fused_experts_layout(model.model.layers[0].mlp.experts) is None  # replaced
        assert model.model.layers[0].mlp.experts.layout == "interleaved"
        assert parts.routers == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
        expert = model.model.layers[0].mlp.experts[1]
        assert expert.up_proj.bias is not None and expert.down_proj.bias is not None
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-5, rtol=0)
        expert.up_proj.weight.zero_()
        anatomy.restore_layout(model, parts)
        assert anatomy.fused_experts_layout(model.model.layers[0].mlp.experts) == "interleaved"
        model.save_pretrained(tmp_path / "saved")
        reloaded = _load(tmp_path / "saved")
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)
        gate_up = reloaded.model.layers[0].mlp.experts.gate_up_proj[1]  # (hidden, 2 x intermediate), interleaved
        assert torch.count_nonzero(gate_up[:, 1::2]) == 0 and torch.count_nonzero(gate_up[:, ::2]) == gate_up.numel() // 2


def test_an_unknown_fused_layout_is_refused_naming_it(moe):
    model = _load(moe)
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(experts.gate_up_proj.shape[:2]))  # a bias: unknown
    with pytest.raises(UserError, match=r"qwen3_moe: model.layers.0.mlp.experts.gate_up_proj \(Qwen3MoeExperts"):
        anatomy.open_for_compression(model)


def test_checkpoint_names_of_experts_follow_the_family():
    assert anatomy.checkpoint_name("mixtral", "model.layers.0.mlp.experts.3.up_proj") == \
        "model.layers.0.block_sparse_moe.experts.3.w3"
    assert anatomy.checkpoint_name("qwen3_moe", "model.layers.0.mlp.experts.3.up_proj") == \
        "model.layers.0.mlp.experts.3.up_proj"
    assert anatomy.checkpoint_name("mixtral", "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"


def test_a_stage_that_changed_little_of_its_targets_fails_the_gate():
    rows = check_coverage([{"type": "prune", "block_weights_changed_share": 0.3, "block_weights_excluded_share": 0.0},
                           {"type": "quantize", "block_weights_changed_share": 0.5,
                            "block_weights_excluded_share": 0.5},
                           {"type": "export_onnx"}], anatomy.MIN_COVERAGE)
    assert [(r.goal, r.passed) for r in rows] == [("coverage.stages[0].prune", False),
                                                  ("coverage.stages[1].quantize", True)]
    assert "changed 30%" in rows[0].note
