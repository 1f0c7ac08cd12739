"""megamft: multitask fine-tuning of code LLMs on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns once per module when Transformer Engine or apex are
# missing; megamft reports the accelerators it found once, in one line
# (megamft.platform.device.describe_runtime), so these repeats are noise.
for _pattern in (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"When using async grad allreduce it is recommended.*",
    r"full scope is deprecated.*",
):
    warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)
warnings.filterwarnings("ignore", message=r".*is deprecated. Please use.*", category=FutureWarning)
# megatron reads `.grad` of non-leaf pipeline tensors; under the CPU emulation
# the read passes through our TorchFunctionMode, which torch then blames.
warnings.filterwarnings(
    "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf",
    category=UserWarning, module=r"megamft\.platform\.cpu_emulation",
)
