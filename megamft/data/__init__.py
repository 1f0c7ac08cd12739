"""Samples, tokenizers, templates and batches."""
