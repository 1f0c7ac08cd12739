"""Pure arithmetic over the config: shapes, parameter counts, memory per device, FLOPs.

Imports nothing heavier than the config, so a check or an estimate runs before torch or megatron-core load.
"""
