"""Imported last by the fork server of the multi-process tests (``tests/multiprocess.py``), after what it preloads.

- With DeepSpeed preloaded, its shared-memory all-reduce kernel is marked incompatible, as
  ``tests/deepspeed/cpu_launch.py`` does for launched scripts: otherwise the first worker that starts DeepSpeed's
  process group JIT-builds it in C++ (about a minute on 2 cores in a fresh checkout), for inference only.
- Everything the server has imported moves to the garbage collector's permanent generation (``gc.freeze``), so a
  forked worker's collections (and ``end_process_group``'s ``gc.collect``) walk the worker's own objects only, not
  the whole of torch and DeepSpeed, and leave the pages it shares with the server unwritten.
"""

import gc
import sys

if "deepspeed" in sys.modules:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

gc.freeze()
