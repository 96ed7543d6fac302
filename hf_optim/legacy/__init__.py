"""Drop-in replacements for the optimization modules of transformers' predecessors.

- :mod:`hf_optim.legacy.pytorch_pretrained_bert`: ``BertAdam``, ``OpenAIAdam`` and the ``_LRSchedule`` family of
  pytorch-pretrained-bert 0.6.2;
- :mod:`hf_optim.legacy.pytorch_transformers`: the ``LambdaLR`` schedules and ``AdamW`` of pytorch-transformers 1.x;
- :func:`load_pickled_legacy_state_dict`: old pickled ``BertAdam`` / ``OpenAIAdam`` state_dicts, read safely.
"""

from hf_optim.legacy import pytorch_pretrained_bert, pytorch_transformers
from hf_optim.legacy.checkpoints import load_pickled_legacy_state_dict

__all__ = ["load_pickled_legacy_state_dict", "pytorch_pretrained_bert", "pytorch_transformers"]
