"""LoRA adapters merged into the base weights, whole or layer by layer."""
