"""Save-and-exit on the signals cluster schedulers send before preemption."""

from __future__ import annotations

import signal

import torch

from megamft.platform import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1; `requested()` tells every rank once any rank got one.

    The handler only sets a flag: the step in flight finishes, then the loop
    saves a checkpoint and returns. Ranks receive signals at different moments,
    so the flag is all-reduced (one scalar per step) to make them stop together,
    over a gloo group: a host flag needs no GPU and must not wait for its queue.
    """

    def __init__(self, enabled: bool):
        self._received: int | None = None
        self._previous = {}
        if enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._received = signum

    def requested(self) -> bool:
        flag = torch.tensor([1 if self._received is not None else 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=distributed.host_group())
        return bool(flag.item())

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
