# placeholder while the real implementation is written
import torch


class AdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, *, foreach=None, fused=None):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, foreach=foreach, fused=fused))


def adamw(*args, **kwargs):
    raise NotImplementedError
