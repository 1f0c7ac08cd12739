"""The training recipe: setup, step, evaluation, loop."""
