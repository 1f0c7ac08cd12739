"""The tests skipped without CUDA (the fused loss kernels, among them the gradients of their per-sample sums
that the preference objectives use, and flash varlen attention) under pytest, read from their JUnit XML; on
a GPU no CUDA-related test may be skipped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .context import Context
from .process import last_error, run_cmd, tail

_CUDA_SKIP = re.compile(r"cuda|gpu|nvcc|kernel", re.I)
_NOT_HERE = re.compile(r"\b([2-9]|\d{2,})\s*gpus\b|transformer.engine|\bTE\b", re.I)


CUDA_TESTS = (
    "tests/test_fused_ce.py",
    "tests/test_attention.py::test_flash_varlen_matches_the_masked_reference_on_cuda",
)


def check_pytest(ctx: Context, rec: dict) -> list:
    xml = ctx.work / "pytest_cuda_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [
        ctx.python,
        "-m",
        "pytest",
        *CUDA_TESTS,
        "-rs",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        f"--basetemp={ctx.work / 'pytest_tmp'}",
        *ctx.profile.pytest_args,
    ]
    result = run_cmd(
        cmd, ctx.work / "logs" / "pytest_cuda_tests.log", ctx.timeout(10_000), ctx.env()
    )
    details = rec["details"]
    details.update(result.brief())
    summary = [
        ln
        for ln in result.output.splitlines()
        if re.search(r"\d+ (passed|failed|skipped|error)", ln)
    ]
    details["summary_line"] = summary[-1].strip("= ") if summary else None
    problems = []
    if result.timed_out:
        problems.append(
            f"pytest timed out after {result.seconds:.0f} s (the first CUDA test builds the kernels)"
        )
    cases = _junit_cases(xml) if xml.is_file() else []
    details["tests"] = len(cases)
    details["passed"] = [c["name"] for c in cases if c["outcome"] == "passed"]
    details["failed"] = [c for c in cases if c["outcome"] in ("failed", "error")]
    details["skipped"] = [c for c in cases if c["outcome"] == "skipped"]
    cuda_skips = [
        c
        for c in details["skipped"]
        if _CUDA_SKIP.search(c["message"]) and not _NOT_HERE.search(c["message"])
    ]
    details["cuda_related_skips"] = [c["name"] for c in cuda_skips]
    if not cases and not result.timed_out:
        problems.append(f"no test results (exit {result.rc}): {last_error(result.output)}")
    for case in details["failed"]:
        problems.append(f"{case['name']} {case['outcome']}: {case['message'][:300]}")
    if cases and result.rc not in (0,) and not details["failed"] and not result.timed_out:
        problems.append(f"pytest exit status {result.rc}")
    if not ctx.dry and cuda_skips:
        problems.append(f"CUDA tests skipped on a GPU machine: {details['cuda_related_skips']}")
    if problems:
        details["output_tail"] = tail(result.output)
    return problems


def _junit_cases(path: Path) -> list:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message") or (child.text or "")
                break
        cases.append({"name": name, "outcome": outcome, "message": message.strip()})
    return cases
