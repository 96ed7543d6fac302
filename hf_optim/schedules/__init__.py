"""Learning-rate schedules, one module per family.

- :mod:`hf_optim.schedules.functions`: transformers' ``get_*_schedule*`` functions (``LambdaLR``), exact to
  transformers 5.x, each described by JSON (``hf_optim_config``, ``_config``) and computed by the multipliers of
  ``_multipliers``; re-exported here and as ``hf_optim.get_*``.
- :mod:`hf_optim.schedules.pretrained_bert`: pytorch-pretrained-bert 0.6.2's ``_LRSchedule`` objects, which
  ``BertAdam`` / ``OpenAIAdam`` keep in their param groups.
- :mod:`hf_optim.schedules.pytorch_transformers`: pytorch-transformers 1.x's ``Warmup*Schedule`` ``LambdaLR``
  classes.

Building a schedule by name lives in :mod:`hf_optim.registry`.
"""

from hf_optim.schedules._config import attach_config, check_json
from hf_optim.schedules.functions import (
    WSD_TYPES,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_wsd_schedule,
)

__all__ = [
    "WSD_TYPES",
    "attach_config",
    "check_json",
    "get_constant_schedule",
    "get_constant_schedule_with_warmup",
    "get_cosine_schedule_with_warmup",
    "get_cosine_with_hard_restarts_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup",
    "get_cosine_with_min_lr_schedule_with_warmup_lr_rate",
    "get_inverse_sqrt_schedule",
    "get_linear_schedule_with_warmup",
    "get_polynomial_decay_schedule_with_warmup",
    "get_wsd_schedule",
]
