"""Losses over per-token cross entropy, masks and task ids."""
