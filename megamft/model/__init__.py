"""Model families, layer specs and builders for megatron-core GPT models."""
