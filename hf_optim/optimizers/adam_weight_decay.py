# placeholder while the real implementation is written
import torch


class AdamWeightDecay(torch.optim.Optimizer):
    def __init__(self, params, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, weight_decay_rate=0.0, include_in_weight_decay=None, exclude_from_weight_decay=None, name="AdamWeightDecay", *, clipnorm=None, clipvalue=None, global_clipnorm=None, foreach=None, fused=None):
        super().__init__(params, dict(lr=learning_rate, betas=(beta_1, beta_2), eps=epsilon, weight_decay=weight_decay_rate, amsgrad=amsgrad))


def adam_weight_decay(*args, **kwargs):
    raise NotImplementedError
