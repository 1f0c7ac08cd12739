"""The process runtime: device detection, distributed set-up, the launcher, signals and preemption,
folder and build locks, checksums, safe publication of outputs, kill points for fault-injection tests."""
