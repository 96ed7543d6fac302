"""Run a script with Accelerate choosing gloo on a CPU-only machine (tests only).

    torchrun --nproc_per_node 2 tests/deepspeed/accelerate_gloo.py SCRIPT ARGS...

Accelerate 1.x (``PartialState._prepare_backend``) picks a backend from the accelerator device only, so on a
CPU-only machine it finds none and counts one process, while DeepSpeed runs several: Trainer's and DeepSpeed's
batch-size checks then fail. This patch makes it pick gloo whenever torchrun started several processes, which is
what a GPU machine gets with nccl; nothing else changes.
"""

import os
import runpy
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _gloo_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    chosen, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if chosen is None and kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return chosen, kind


PartialState._prepare_backend = _gloo_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
