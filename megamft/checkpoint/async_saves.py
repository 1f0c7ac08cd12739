"""Checkpoints written in the background (megatron's async save): published once written, abandoned on Ctrl-C.

megatron-core forks a writer process per save (TemporalAsyncCaller); the trainer
goes on training, and `poll` after each step runs the saves' finalization (the
rename of the `.partial` folder and the `latest` pointer, see dist_checkpoint)
once every rank's writer has finished. A run that fails or is interrupted
abandons what is still in flight: the writers are killed and their `.partial`
folders removed, so that nothing half-written remains and no writer outlives it.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from megamft.checkpoint.save_failures import unfinished_removed
from megamft.platform.kill_points import kill_point


def write_in_background(iteration: int, write, *args, **kwargs):
    """The background writer process: deaf to Ctrl-C (the trainer decides, and abandons the save)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(
        signal.SIG_UNBLOCK, [signal.SIGINT]
    )  # blocked since the fork; a pending one is dropped
    kill_point("save.writing", iteration)
    return write(*args, **kwargs)


@dataclass
class _InFlight:
    partial: Path
    iteration: int
    save_dir: str | Path


class AsyncSaves:
    """Checkpoints written by background processes (megatron's async save), published when all finished.

    `poll` after every step publishes the saves that every rank has completed;
    `wait` blocks until all are published; `abandon` (a run that failed or was
    interrupted) stops the writers and removes the saves' `.partial` folders. A save
    still in flight when the run is killed outright stays a `.partial` folder, which
    loading ignores.
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue()
        self._in_flight: list[
            _InFlight
        ] = []  # in the queue's order: megatron finalizes them first in, first out

    def schedule(self, request, partial: Path, iteration: int, save_dir: str | Path) -> None:
        # Ctrl-C reaches the whole process group: the writer forked here starts with SIGINT blocked, and
        # ignores it from its first line on (write_in_background).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        try:
            self._queue.schedule_async_request(request)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._in_flight.append(_InFlight(partial, iteration, save_dir))

    def poll(self) -> None:
        self._finalize(blocking=False)

    def wait(self) -> None:
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if not self._in_flight:
            return
        first = self._in_flight[0]
        # A failed or interrupted finalization: the writers stop first, then the disk is asked (a full one
        # is named) and the folders go.
        with unfinished_removed(
            [save.partial for save in self._in_flight], first.iteration, first.save_dir
        ):
            try:
                done = self._queue.maybe_finalize_async_calls(blocking=blocking)
            except BaseException:
                self._stop_writers()
                self._in_flight.clear()
                raise
        del self._in_flight[: len(done)]

    def abandon(self) -> None:
        """Stop the background writers of every save not yet published and remove their folders."""
        self._stop_writers()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            for save in self._in_flight:
                shutil.rmtree(save.partial, ignore_errors=True)
        self._in_flight.clear()

    def _stop_writers(self) -> None:
        for call in self._queue.async_calls:
            process = getattr(call.async_caller, "process", None)
            if process is not None:  # megatron's TemporalAsyncCaller: the forked writer
                process.kill()
                process.join()
                call.async_caller.process = None
        self._queue.async_calls.clear()
