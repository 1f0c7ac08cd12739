"""Evaluation of trained models: HumanEval pass@k with sandboxed execution."""
