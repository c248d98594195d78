"""Tiny random causal LMs of the mainstream decoder architectures, built from their transformers configs
(`AutoConfig.for_model`), for the support matrix: hidden size 64, two blocks, the tests' tokenizer, and for
mixture-of-experts families four experts with two chosen per token."""

from __future__ import annotations

from pathlib import Path

# model_type -> config overrides beyond the common small sizes
ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {},
    "olmo2": {}, "granite": {}, "phi": {}, "gpt_neox": {}, "opt": {}, "falcon": {}, "gpt2": {},
    "qwen3_moe": {}, "mixtral": {}, "deepseek_v3": {}, "gpt_oss": {},
}
MOE = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
# Families whose config can tie the head to the embeddings and can untie it
TIE_OPTIONAL = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi", "gpt_neox", "opt", "falcon",
                "gpt2", "qwen3_moe", "mixtral")


def config_for(kind: str, vocab_size: int, tied: bool):
    from transformers import AutoConfig

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=0,
                 bos_token_id=2, eos_token_id=3, tie_word_embeddings=tied)
    if kind == "gpt2":
        sizes = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab_size, bos_token_id=2,
                     eos_token_id=3, pad_token_id=0, tie_word_embeddings=tied)
    elif kind == "opt":
        sizes.update(ffn_dim=128, word_embed_proj_dim=64)
        sizes.pop("num_key_value_heads")
    elif kind in ("falcon", "gpt_neox"):
        sizes.pop("num_key_value_heads")
    if kind in MOE:
        sizes.update(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32)
    if kind == "deepseek_v3":
        sizes.update(num_key_value_heads=4, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    if kind == "gpt_oss":
        sizes.update(head_dim=16)
    if kind in ("gemma2", "gemma3_text"):
        sizes.update(head_dim=16)
    sizes.update(ARCHITECTURES[kind])
    return AutoConfig.for_model(kind, **sizes)


def build_architecture(folder: Path, kind: str, tied: bool = False) -> Path:
    """A seeded random `kind` causal LM with the tests' tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from .conftest import _tokenizer, causal_tokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _tokenizer(folder)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    model = AutoModelForCausalLM.from_config(config_for(kind, vocab_size, tied))
    model.eval()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    causal_tokenizer(folder)
    return folder
