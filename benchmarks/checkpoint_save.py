"""What a checkpoint save costs a training rank: host memory and time blocked, old format vs new, at DP=2.

    python benchmarks/checkpoint_save.py [--layers 8 --hidden 768 --ffn 2048 --saves 2 --json]

Each case runs in a fresh DP=2 job on the CPU (megatron's real code under gloo): one bf16 training
step gives every rank its Adam state, then checkpoints are written through
megamft.checkpoint.dist_checkpoint.save, as the training loop writes them. Cases:

  old             checkpoint.optimizer_format=reshardable (megatron's fully_reshardable) through
                  megatron's plain torch_dist strategy: what megamft did before (the job puts that
                  strategy back in place of the fully parallel one)
  reshardable     the same format through megatron's fully parallel strategy over DP
  new             checkpoint.optimizer_format=dp_sharded (dp_reshardable), fully parallel: the default

each synchronously and asynchronously (checkpoint.async_save). Per rank:

  blocked   seconds the save call keeps the training loop waiting (sync: the whole save; async: until
            the write is handed to the background process), the slowest rank's, median of `--saves`
            saves; "written": until the checkpoint is complete
  main +    the training process's peak resident memory above its size just before one more save
            (VmHWM, reset through /proc/self/clear_refs)
  all +     the peak, over that save, of the proportional set size (Pss) of the training process and
            every process it has started (megatron forks writers for sync saves too; an async save forks
            a background process that forks the writers), sampled every 10 ms from
            /proc/<pid>/smaps_rollup, above the same sum just before. Pss splits a page shared by n
            processes n ways, so the pages a forked writer shares with its parent count once: the
            sum is the host memory the save adds.
  / own     all +, divided by the bytes of the rank's own optimizer state (fp32 main parameters and
            Adam's two moments of its DP shard)

The jobs run with MALLOC_MMAP_THRESHOLD_=1048576: glibc then maps every allocation of 1 MB or more
on its own and unmaps it when freed, so one save's freed buffers do not hide the next one's peak
(by default the threshold grows to 32 MB, and a freed tensor below it stays in the process's heap).

megamft's strict device emulation copies emulated device tensors to the host as CUDA would, so the
copy a save makes of what it writes is measured; only the old format's all-gather receive buffers,
device memory on a GPU, count as host memory here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from megamft.testing.distributed import launch

CASES = {  # name: (checkpoint.optimizer_format, megatron's plain strategy instead of the fully parallel one)
    "old": ("reshardable", True),
    "reshardable": ("reshardable", False),
    "new": ("dp_sharded", False),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # it has exited
        return 0
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))


def tree_pss_kb() -> int:
    """Host memory of this process and every process it started, shared pages counted once."""
    pid = os.getpid()
    return sum(_pss_kb(p) for p in [pid, *_descendants(pid)])


class TreeMemory:
    """Peak of tree_pss_kb while running (a sampling thread)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_pss_kb())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _own_optimizer_bytes(optimizer) -> int:
    """This rank's optimizer state: its main parameters and every tensor of their optimizer state."""
    import torch

    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                total += param.numel() * param.element_size()
                total += sum(
                    t.numel() * t.element_size()
                    for t in opt.optimizer.state[param].values()
                    if torch.is_tensor(t) and t.dim() > 0
                )
    return total


def measure_saves(case: str, async_save: bool, saves: int, save_dir: str, model: list[str]) -> dict:
    """One rank of a case: a training step, then `saves` checkpoints, each measured."""
    import gc

    import torch
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    from megamft.checkpoint import dist_checkpoint, sharding
    from megamft.config import load_config, validate
    from megamft.data.dataset import load_data
    from megamft.platform import distributed
    from megamft.training.setup import build_training_state
    from megamft.training.step import train_step

    optimizer_format, plain_strategy = CASES[case]
    cfg = load_config(
        [],
        [
            *model,
            "train.precision=bf16",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            f"checkpoint.save_dir={save_dir}",
            "checkpoint.keep_last=1",
            f"checkpoint.optimizer_format={optimizer_format}",
            f"checkpoint.async_save={async_save}",
        ],
    )
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    runtime = distributed.initialize(cfg)
    try:
        if (
            plain_strategy
        ):  # megamft before the fully parallel strategies: megatron's default torch_dist one
            sharding.save_strategy = get_default_save_sharded_strategy
        data = load_data(cfg.data)
        state = build_training_state(cfg, runtime, data.vocab_size)
        dp_rank, dp = (
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
        rows = data.train_rows(0, cfg.train.global_batch_size, dp_rank, dp)
        train_step(state, data.batches(rows, cfg.train.micro_batch_size), data.task_names)
        queue = dist_checkpoint.AsyncSaves() if async_save else None

        def save(iteration: int) -> tuple[float, float]:
            start = time.perf_counter()
            dist_checkpoint.save(state, save_dir, iteration, 0, cfg, async_saves=queue)
            blocked = time.perf_counter() - start
            if queue is not None:
                queue.wait()
            return blocked, time.perf_counter() - start

        timed = []
        for iteration in range(1, saves + 1):
            torch.distributed.barrier()
            timed.append(save(iteration))
        gc.collect()
        torch.distributed.barrier()
        before_main, before_all = _status_kb("VmRSS"), tree_pss_kb()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        with TreeMemory() as tree:
            save(saves + 1)
        measured = {
            "main_kb": _status_kb("VmHWM") - before_main,
            "all_kb": tree.peak_kb - before_all,
        }
        return {"own_bytes": _own_optimizer_bytes(state.optimizer), "timed": timed, **measured}
    finally:
        distributed.shutdown()


def run_case(case: str, async_save: bool, saves: int, model: list[str], scratch: Path) -> dict:
    save_dir = scratch / f"{case}-{'async' if async_save else 'sync'}"
    ranks = launch(
        measure_saves,
        2,
        timeout=3600,
        kwargs={
            "case": case,
            "async_save": async_save,
            "saves": saves,
            "save_dir": str(save_dir),
            "model": model,
        },
    )
    shutil.rmtree(save_dir, ignore_errors=True)
    slowest = [[max(rank["timed"][i][k] for rank in ranks) for i in range(saves)] for k in (0, 1)]
    return {
        "case": case,
        "mode": "async" if async_save else "sync",
        "own_mb": max(rank["own_bytes"] for rank in ranks) / 2**20,
        "blocked_s": statistics.median(slowest[0]),
        "written_s": statistics.median(slowest[1]),
        "main_mb": max(rank["main_kb"] for rank in ranks) / 1024,
        "all_mb": max(rank["all_kb"] for rank in ranks) / 1024,
        "all_per_own": max(rank["all_kb"] * 1024 / rank["own_bytes"] for rank in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument(
        "--saves", type=int, default=2, help="timed saves per case (then one measured for memory)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    model = [
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={args.ffn}",
        f"model.num_attention_heads={args.hidden // 64}",
        "data.seq_length=256",
        "data.max_samples_per_task=16",
        "data.valid_samples_per_task=0",
    ]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(
        2**20
    )  # inherited by the launched ranks (see the docstring)
    with tempfile.TemporaryDirectory(prefix="megamft-ckpt-bench-") as scratch:
        rows = [
            run_case(case, async_save, args.saves, model, Path(scratch))
            for async_save in (False, True)
            for case in CASES
        ]
    print(
        f"\nDP=2 on the CPU, {args.layers} layers x hidden {args.hidden}, own optimizer state "
        f"{rows[0]['own_mb']:.0f} MB per rank; time: median of {args.saves} saves, slowest rank; memory: "
        "one more save, the rank that added more"
    )
    print(
        f"{'case':<12} {'mode':<6} {'blocked s':>10} {'written s':>10} {'main +MB':>9} {'all +MB':>8} "
        f"{'all + / own':>12}"
    )
    for r in rows:
        print(
            f"{r['case']:<12} {r['mode']:<6} {r['blocked_s']:>10.2f} {r['written_s']:>10.2f} {r['main_mb']:>9.0f} "
            f"{r['all_mb']:>8.0f} {r['all_per_own']:>12.2f}"
        )
    by = {(r["case"], r["mode"]): r for r in rows}
    for mode in ("sync", "async"):
        old, new = by[("old", mode)], by[("new", mode)]
        print(
            f"new/old {mode:<5}: time blocked {new['blocked_s'] / old['blocked_s']:.2f}x, "
            f"host memory added {new['all_per_own'] / old['all_per_own']:.2f}x"
        )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
