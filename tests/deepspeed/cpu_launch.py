"""Run a DeepSpeed script the way the tests need on a CPU-only machine (tests only).

    torchrun --nproc_per_node 2 tests/deepspeed/cpu_launch.py SCRIPT ARGS...
    python tests/deepspeed/cpu_launch.py SCRIPT ARGS...

Two changes, nothing else:

- Accelerate 1.x (``PartialState._prepare_backend``) picks a backend from the accelerator device only, so on a
  CPU-only machine it finds none and counts one process, while DeepSpeed runs several: Trainer's and DeepSpeed's
  batch-size checks then fail. It picks gloo here whenever torchrun started several processes, which is what a GPU
  machine gets with nccl.
- DeepSpeed's CPU accelerator JIT-builds its shared-memory all-reduce kernel (``deepspeed_shm_comm``, used by
  ``inference_all_reduce`` only) when it starts its process group: a C++ build of about a minute on 2 cores
  whenever ``~/.cache/torch_extensions`` holds none for this interpreter's paths, as in every fresh checkout. The
  op is marked incompatible (DeepSpeed's own table), as on a platform without the kernel.
"""

import os
import runpy
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed.ops
from accelerate.state import PartialState
from accelerate.utils import DistributedType

if "deepspeed_shm_comm" not in deepspeed.ops.__compatible_ops__:  # the same name in tests/fork_server.py
    raise SystemExit("cpu_launch.py: this DeepSpeed has no op 'deepspeed_shm_comm': update the tests' patch")
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

_prepare_backend = PartialState._prepare_backend


def _gloo_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    chosen, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if chosen is None and kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return chosen, kind


PartialState._prepare_backend = _gloo_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
