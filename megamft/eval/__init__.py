"""Evaluation of trained models: HumanEval pass@k with sandboxed execution."""

from megamft.errors import UserError


class EvaluationError(UserError, ValueError):
    """An evaluation that cannot run as asked: its settings, problems file or output folder."""
