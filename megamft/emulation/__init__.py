"""The strict CUDA emulation on the CPU: tensors tagged as host or device, NCCL rules for gloo
collectives, host-sync counting. Apart from the process runtime (megamft.platform)."""
