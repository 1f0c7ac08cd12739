"""The documentation cannot drift: generated references match the code, relative links resolve.

docs/reference/config.md and cli.md are written by tools/generate_reference_docs.py from the
schema's field docstrings and the commands' argparse parsers; the committed files must equal what
it writes now. Every relative link in README.md and docs/ must name a file that exists (anchors
are checked by `mkdocs build --strict` in .ci/run). The README's set-up commands are the ones CI runs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "generate_reference_docs", ROOT / "tools" / "generate_reference_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_generated_from_the_schema():
    generator = _generator()
    committed = (ROOT / generator.CONFIG_MD).read_text()
    assert committed == generator.config_reference(), (
        "docs/reference/config.md is stale: run python tools/generate_reference_docs.py"
    )


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11),
    reason="argparse's help layout differs between Python versions; "
    "the committed file is generated under Python 3.11, the project's version",
)
def test_cli_reference_is_generated_from_the_parsers():
    generator = _generator()
    committed = (ROOT / generator.CLI_MD).read_text()
    assert committed == generator.cli_reference(), (
        "docs/reference/cli.md is stale: run python tools/generate_reference_docs.py"
    )


def test_every_schema_key_is_in_the_config_reference():
    """Independent of the generator's walk: every `name: type` line of every section class appears."""
    from dataclasses import fields

    from megamft.config.schema import MegamftConfig

    text = (ROOT / "docs" / "reference" / "config.md").read_text()
    for section in fields(MegamftConfig):
        default = section.default_factory()
        if isinstance(default, dict):
            assert f"## `{section.name}`" in text
            continue
        for key in fields(default):
            assert f"### `{section.name}.{key.name}`" in text, f"{section.name}.{key.name} missing"


def _markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for path in _markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_pages_are_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = 'pip install -c constraints/cpu.txt ".[test]" && python -m pytest tests -n 2 --dist loadfile'
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pip install -c constraints/cpu.txt . && bash examples/run_cpu_quickstart.sh" in readme
    assert len(readme.splitlines()) <= 260, "README.md is the front door: move details into docs/"
