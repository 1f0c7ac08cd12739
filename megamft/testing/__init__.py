"""Helpers for testing megamft (and your own megatron code) on a CPU."""
