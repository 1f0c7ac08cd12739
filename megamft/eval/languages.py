"""The languages whose programs the sandbox runs: Python, and C++, Java, JavaScript and Go with their
toolchains (HumanEval-X and MultiPL-E problems).

A language names the executables it needs, the file its program is written to, and the shell
commands that compile and run it there (each tool by its absolute path, found on this machine's
PATH when the problems are loaded). Programs run in the sandbox's working directory; compilation
counts towards the time limit. Runtimes that reserve large address ranges up front (the JVM, V8,
Go) are limited by their data size (RLIMIT_DATA) instead of their address space (RLIMIT_AS).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

from megamft.errors import UserError


class MissingToolchain(UserError, RuntimeError):
    """Problems of a language whose compiler or runtime is not installed."""


@dataclass(frozen=True)
class Language:
    name: str
    tools: tuple[str, ...]
    """Executables found on PATH (the first is what the user installs: a compiler, a JDK, Node.js, Go)."""
    install: str
    """What to install when they are missing."""
    limit_address_space: bool = True
    failure_text: str = ""
    """Text on stderr that marks a failed test although the exit status is 0 (console.assert)."""

    def file_name(self, program: str) -> str:
        if self.name == "java":
            return f"{java_main_class(program)}.java"
        return {
            "python": "program.py",
            "cpp": "program.cpp",
            "js": "program.js",
            "go": "program_test.go",
        }[self.name]

    def script(self, tools: dict[str, str], program: str) -> str:
        """Shell commands (run by /bin/sh in the working directory) that build and run the program."""
        file = self.file_name(program)
        if self.name == "cpp":
            return f"'{tools['g++']}' -std=c++17 -O1 -o program {file} && ./program"
        if self.name == "java":
            return (
                f"'{tools['javac']}' -J-XX:-UsePerfData -encoding UTF-8 {file} && "
                f"'{tools['java']}' -XX:-UsePerfData -ea {java_main_class(program)}"
            )
        if self.name == "js":
            return f"'{tools['node']}' {file}"
        if self.name == "go":  # a module of its own, offline: only the standard library
            # TMPDIR one level down: go ignores a go.mod in its temporary root (the sandbox's TMPDIR is $PWD)
            return (
                f'mkdir -p .tmp; export TMPDIR="$PWD/.tmp" GOCACHE="$PWD/.gocache" GOPATH="$PWD/.gopath" '
                f"GOPROXY=off GOFLAGS=-mod=mod; "
                f"'{tools['go']}' mod init megamft.eval/problem >/dev/null 2>&1 && '{tools['go']}' test ./..."
            )
        raise ValueError(f"no build commands for {self.name}")


LANGUAGES = {
    "python": Language("python", (), "Python"),
    "cpp": Language("cpp", ("g++",), "g++ (e.g. apt-get install g++)"),
    "java": Language(
        "java",
        ("javac", "java"),
        "a JDK (e.g. apt-get install default-jdk-headless)",
        limit_address_space=False,
    ),
    "js": Language(
        "js",
        ("node",),
        "Node.js (e.g. apt-get install nodejs)",
        limit_address_space=False,
        failure_text="Assertion failed",
    ),
    "go": Language("go", ("go",), "Go (e.g. apt-get install golang-go)", limit_address_space=False),
}
# How benchmark files name them: HumanEval-X task ids ("CPP/0"), MultiPL-E "language" fields.
ALIASES = {
    "python": "python",
    "py": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "java": "java",
    "js": "js",
    "javascript": "js",
    "go": "go",
    "golang": "go",
}


def language(name: str) -> Language:
    key = ALIASES.get(name.lower())
    if key is None:
        raise ValueError(
            f"language {name!r} is not supported (supported: Python, C++, Java, JavaScript, Go)"
        )
    return LANGUAGES[key]


def find_tools(lang: Language, where: str) -> dict[str, str]:
    """{tool: absolute path} of a language's toolchain; MissingToolchain naming what is absent and `where`
    the problems come from."""
    found = {tool: shutil.which(tool) for tool in lang.tools}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise MissingToolchain(
            f"{where}: {lang.name} problems need {' and '.join(lang.tools)} on PATH (not found: "
            f"{', '.join(missing)}); install {lang.install}, or leave these problems out"
        )
    return found


def java_main_class(program: str) -> str:
    """The class whose `main` runs the tests (HumanEval-X: Main; MultiPL-E: Problem)."""
    before_main = (
        program[: program.find("static void main")] if "static void main" in program else program
    )
    classes = re.findall(r"\bclass\s+(\w+)", before_main)
    return classes[-1] if classes else "Main"
