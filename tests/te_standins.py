"""CPU stand-ins for the Transformer Engine modules of megatron's TE layer spec.

Transformer Engine needs CUDA; megatron-core's wrappers of its modules
(megatron/core/extensions/transformer_engine.py) cannot be built without it.
The stand-ins follow the wrappers' contracts as that file defines them, with
the arithmetic of megatron's own local modules (real megatron code):

- ``TENorm.__new__(cls, config, hidden_size, eps=1e-5)`` returns
  ``te.pytorch.RMSNorm(hidden_size, eps, sequence_parallel=..., ...)`` or its
  LayerNorm: a module with a ``weight`` of [hidden] (and ``bias``), forward(x) -> x
  normalized. Stand-in: megamft's RMSNorm/LayerNorm (model/norm.py).
- ``TEColumnParallelLinear.__init__(input_size, output_size, *, config, init_method,
  gather_output, bias, skip_bias_add, is_expert, skip_weight_param_allocation=False,
  tp_comm_buffer_name=None, tp_group=None, stride=1)``: refuses gather_output, keeps
  its group in ``_tp_group``, ``weight`` is [output / TP, input]; ``TELinear.forward(x)``
  takes the input alone and returns (output, bias or None); sharded_state_dict
  splits weight and bias on axis 0.
- ``TERowParallelLinear.__init__(input_size, output_size, *, config, init_method,
  bias, input_is_parallel, skip_bias_add, is_expert, tp_comm_buffer_name=None,
  tp_group=None)``: refuses input_is_parallel=False; weight [output, input / TP],
  split on axis 1; forward(x) -> (output, bias or None).
- ``TELayerNormColumnParallelLinear``: te.pytorch.LayerNormLinear, which owns its
  input norm's ``layer_norm_weight``; the column linear's contract otherwise.
- ``TEDotProductAttention.__init__(config, layer_number, attn_mask_type,
  attention_type, attention_dropout=None, softmax_scale=None, k_channels=None,
  v_channels=None, num_splits=None, cp_comm_type="p2p", pg_collection=None)``,
  forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
  packed_seq_params=None): megamft's TorchCoreAttention takes the same arguments.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megamft.model.attention import TorchCoreAttention
from megamft.model.lora_spec import TEModules
from megamft.model.norm import norm_class


class TENorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        return norm_class(config.normalization)(config, hidden_size, eps)


class TEColumnParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method,
        gather_output,
        bias,
        skip_bias_add,
        is_expert,
        skip_weight_param_allocation=False,
        tp_comm_buffer_name=None,
        tp_group=None,
        stride=1,
    ):
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            gather_output=False,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            skip_weight_param_allocation=skip_weight_param_allocation,
            tp_group=tp_group,
            stride=stride,
        )
        self._tp_group = self.tp_group

    def forward(self, x):
        return super().forward(x)


class TERowParallelLinear(RowParallelLinear):
    def __init__(
        self,
        input_size,
        output_size,
        *,
        config,
        init_method,
        bias,
        input_is_parallel,
        skip_bias_add,
        is_expert,
        tp_comm_buffer_name=None,
        tp_group=None,
    ):
        if not input_is_parallel:
            raise ValueError(
                "Transformer Engine linear layers do not support input_is_parallel = False"
            )
        super().__init__(
            input_size,
            output_size,
            config=config,
            init_method=init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=skip_bias_add,
            is_expert=is_expert,
            tp_group=tp_group,
        )
        self._tp_group = self.tp_group

    def forward(self, x):
        return super().forward(x)


class TELayerNormColumnParallelLinear(TEColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))


class TEDotProductAttention(TorchCoreAttention):
    pass


STAND_INS = TEModules(
    norm=TENorm,
    column_linear=TEColumnParallelLinear,
    row_linear=TERowParallelLinear,
    core_attention=TEDotProductAttention,
)
