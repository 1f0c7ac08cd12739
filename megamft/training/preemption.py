"""Save-and-exit on the signals cluster schedulers send before preemption."""

from __future__ import annotations

import signal

from megamft.platform.signals import PREEMPTION_SIGNALS


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
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._received = signum

    def requested(self) -> bool:
        import torch  # this module is imported before torch, to catch signals during start-up

        from megamft.platform import distributed

        flag = torch.tensor([1 if self._received is not None else 0])
        torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MAX, group=distributed.host_group()
        )
        return bool(flag.item())

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
