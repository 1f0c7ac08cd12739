"""Per-task expert statistics: tokens each task routes to each expert, per MoE layer.

A forward hook on every megatron router (TopKRouter) adds its routing map
([tokens, experts], the top-k choice) into a [layers, tasks + 1, experts]
count on the device, by the task of each token (the last row: padding). The
micro-batch's task ids arrive through ``route_tasks``, which the training step
calls before the model runs (train_step's ``before_forward``). Nothing is read back until ``read``, which the
training loop calls at log intervals only.

Counted once per token per forward pass: routers that run in eval mode
(validation) and recomputation inside backward (activation recompute) are skipped.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ExpertStats:
    """Device-side counts of routed tokens per (layer, task, expert) over a log interval."""

    def __init__(
        self,
        chunks: list,
        num_layers: int,
        num_tasks: int,
        num_experts: int,
        sequence_parallel: bool,
    ):
        self.counts = torch.zeros(
            num_layers,
            num_tasks + 1,
            num_experts,
            dtype=torch.long,
            device=torch.cuda.current_device(),
        )
        self.sequence_parallel = sequence_parallel
        self._current_tasks: torch.Tensor | None = (
            None  # [batch, seq] task ids of the micro-batch in flight
        )
        self._handles = [
            module.register_forward_hook(self._count)
            for chunk in chunks
            for module in chunk.modules()
            if isinstance(module, TopKRouter)
        ]

    def route_tasks(self, batch: dict) -> None:
        """Note the task of each token of the micro-batch about to be forwarded ([batch, seq] routed_task_ids,
        num_tasks for padding)."""
        self._current_tasks = batch.get("routed_task_ids")

    def _count(self, router, inputs, outputs) -> None:
        if not router.training or self._current_tasks is None or _in_backward():
            return
        _, routing_map = outputs
        tasks = self._tasks_in_router_order(self._current_tasks, routing_map.shape[0])
        self.counts[router.layer_number - 1].index_add_(0, tasks, routing_map.long())

    def _tasks_in_router_order(self, tasks: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Routers see [seq, batch] flattened; under sequence parallel, this TP rank's slice of seq."""
        tasks = tasks.t()
        if tasks.numel() != num_tokens:
            rows = num_tokens // tasks.shape[1]
            start = parallel_state.get_tensor_model_parallel_rank() * rows
            tasks = tasks[start : start + rows]
        return tasks.reshape(-1)

    def read(self) -> torch.Tensor:
        """[layers, tasks + 1, experts] counts since the last read, summed over all ranks (a host tensor).

        The one device-to-host read of these statistics: call it at log intervals only.
        """
        counts = self.counts.clone()
        self.counts.zero_()
        torch.distributed.all_reduce(
            counts, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        torch.distributed.all_reduce(
            counts, group=parallel_state.get_pipeline_model_parallel_group()
        )
        if self.sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(
                counts, group=parallel_state.get_tensor_model_parallel_group()
            )
        return counts.cpu()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def expert_shares(counts: torch.Tensor, task_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per task: the share of its routed tokens that went to each expert, over all layers ([experts])."""
    shares = {}
    for index, name in enumerate(task_names):
        per_expert = counts[:, index].sum(0).double()
        total = per_expert.sum()
        if total > 0:
            shares[name] = per_expert / total
    return shares
