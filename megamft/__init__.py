"""megamft: multitask fine-tuning of code LLMs on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron reads `.grad` of non-leaf pipeline tensors; under the CPU emulation
# the read passes through our TorchFunctionMode, which torch then blames.
# (The notices libraries print on import are silenced by the commands, in
# megamft.entry_point, not here.)
warnings.filterwarnings(
    "ignore",
    message=r"The \.grad attribute of a Tensor that is not a leaf",
    category=UserWarning,
    module=r"megamft\.platform\.cpu_emulation",
)
