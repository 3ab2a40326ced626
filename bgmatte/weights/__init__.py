"""The embedded default model (default.safetensors) and its model card (MODEL_CARD.md)."""
