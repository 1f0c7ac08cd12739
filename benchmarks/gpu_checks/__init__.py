"""The checks behind benchmarks/gpu_check.py, one module per job.

profiles         what a GPU run and a dry run check, and their time limits
process          child processes in their own process groups, killed on timeout or interrupt
report           the JSON report (rewritten after every change) and its printed summary
context          what the checks share during a run
training_runs    one `python -m megamft train` subprocess and what its log says
environment      versions, GPU, git and compiler information (a probe in a child process)
pytest_check     tests/test_fused_ce.py and the flash varlen test, read from their JUnit XML
training_checks  loss modes, checkpoint resume, LoRA
export_check     megatron-to-hf exports compared with transformers (a comparison in a child process)
benchmark_check  benchmarks/fused_ce.py
driver           runs the checks in order within their time limits
"""
