"""Process-level runtime: device detection, CPU emulation, process groups."""
