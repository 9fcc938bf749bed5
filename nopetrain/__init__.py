"""nopetrain: LLM pretraining with selective NoPE and DroPE on DeepSpeed ZeRO."""

import os

__version__ = "0.1.0"

# nopetrain trains on CUDA or on the CPU. On a machine without a GPU driver DeepSpeed would take the CPU too, after
# a warning at every start that it "was unable to detect" an accelerator; naming it first keeps a CPU run's output
# to what the run says. Checked without torch, whose import takes seconds (dry runs fail in the first one). A
# DS_ACCELERATOR already set wins.
if not any(os.path.exists(driver) for driver in ("/proc/driver/nvidia/version", "/dev/kfd")):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
