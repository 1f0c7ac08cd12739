"""Jobs of the model-family tests that run on real processes (megamft.testing.launch)."""

from __future__ import annotations


def rotary_tables(models: list[dict], positions: list[int]) -> list[tuple]:
    """(cos, sin) [positions, rotary dim] that megatron's attention applies, for each model section.

    Each GPTModel is built by megamft's builder; cos and sin are scaled by the attention factor
    megatron's attention.py applies (_yarn_get_concentration_factor_from_config), as attention does.
    """
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    from megamft.config import MegamftConfig, ModelConfig
    from megamft.model.builder import build_model_chunks, transformer_config
    from megamft.platform import distributed

    tables = []
    try:
        for fields in models:
            cfg = MegamftConfig(model=ModelConfig(**fields))
            if not tables:
                distributed.initialize(cfg)
            config = transformer_config(cfg)
            chunk = build_model_chunks(cfg, config, 128, "torch")[0]
            emb = chunk.rotary_pos_emb(max(positions) + 1)
            emb = emb[0] if isinstance(emb, tuple) else emb  # YaRN also returns its mscale
            angles = emb[positions, 0, 0].float()
            scale = _yarn_get_concentration_factor_from_config(config)
            tables.append(((angles.cos() * scale).cpu(), (angles.sin() * scale).cpu()))
    finally:
        distributed.shutdown()
    return tables
