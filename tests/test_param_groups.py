"""Decay / no-decay grouping of a model's parameters: hand-written expectations, transformers' Trainer rule on real
transformers models, and the Keras include/exclude override."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_optim.param_groups import (
    compile_patterns,
    decay_applies,
    get_decay_parameter_names,
    get_no_decay_parameter_names,
    group_parameters,
    is_norm_module,
)


class LlamaLikeRMSNorm(nn.Module):  # a custom norm class, as transformers models define them
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.ln_1 = nn.LayerNorm(4)  # caught by type only (name has no "norm")
        self.post_norm = LlamaLikeRMSNorm(4)  # caught by class name and by "_norm."
        self.rms = nn.RMSNorm(4)  # caught by type only
        self.bn = nn.BatchNorm1d(4)  # caught by type only
        self.mlp = nn.Linear(4, 4, bias=False)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = Block()
        self.norm = LlamaLikeRMSNorm(4)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


# named_parameters() order: a module's own parameters first, then its children's
DECAY = ["scale", "embed.weight", "block.attn.weight", "block.mlp.weight", "head.weight", "frozen.weight"]
NO_DECAY = {
    "block.attn.bias",
    "block.ln_1.weight",
    "block.ln_1.bias",
    "block.post_norm.weight",
    "block.rms.weight",
    "block.bn.weight",
    "block.bn.bias",
    "norm.weight",
    "head.bias",
    "frozen.bias",
}


def test_norm_modules():
    for module in (
        nn.LayerNorm(3),
        nn.RMSNorm(3),
        nn.GroupNorm(1, 3),
        nn.BatchNorm2d(3),
        nn.InstanceNorm1d(3),
        LlamaLikeRMSNorm(3),
    ):
        assert is_norm_module(module), module

    class NormalizingFlow(nn.Module):  # "Norm" followed by lower case is not a norm layer
        pass

    for module in (nn.Linear(2, 2), nn.Embedding(2, 2), NormalizingFlow()):
        assert not is_norm_module(module), module


def test_default_rule_on_a_hand_built_model():
    model = Tiny()
    assert get_no_decay_parameter_names(model) == NO_DECAY
    assert get_decay_parameter_names(model) == DECAY


def test_groups_hold_named_trainable_parameters_decay_first():
    model = Tiny()
    groups = group_parameters(model, weight_decay=0.1)
    assert [n for n, _ in groups[0]["params"]] == [n for n in DECAY if not n.startswith("frozen")]
    assert {n for n, _ in groups[1]["params"]} == NO_DECAY - {"frozen.bias"}
    assert groups[0]["weight_decay"] == 0.1
    assert groups[1]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    for group in groups:
        for name, param in group["params"]:
            assert named[name] is param


def test_include_overrides_defaults_and_exclude_adds():
    model = Tiny()
    groups = group_parameters(
        model,
        weight_decay=0.1,
        include_in_weight_decay=[r"^norm\."],
        exclude_from_weight_decay=["embed", "head"],
    )
    decay = [n for n, _ in groups[0]["params"]]
    assert decay == ["scale", "block.attn.weight", "block.mlp.weight", "norm.weight"]
    # a tensor key other than weight_decay for optimizers with their own group key
    keyed = group_parameters(model, weight_decay=0.1, weight_decay_key="weight_decay_rate")
    assert keyed[0]["weight_decay_rate"] == 0.1 and "weight_decay" not in keyed[0]


def test_zero_weight_decay_gives_one_group_even_with_include():
    groups = group_parameters(Tiny(), weight_decay=0.0, include_in_weight_decay=[".*"])
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == len(DECAY) + len(NO_DECAY) - 2  # the frozen Linear is left out


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="exclude_from_weight_decay"):
        group_parameters(Tiny(), weight_decay=0.1, exclude_from_weight_decay=["(unclosed"])
    with pytest.raises(TypeError, match="include_in_weight_decay"):
        group_parameters(Tiny(), weight_decay=0.1, include_in_weight_decay=[3])
    with pytest.raises(TypeError, match="model"):
        group_parameters([nn.Parameter(torch.zeros(1))], weight_decay=0.1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        group_parameters(frozen, weight_decay=0.1)


def test_keras_rule_unchanged():
    include, exclude = compile_patterns(["bias_keep"], "i"), compile_patterns(["bias"], "e")
    assert decay_applies("dense/kernel", weight_decay=0.1, include=include, exclude=exclude)
    assert not decay_applies("dense/bias", weight_decay=0.1, include=include, exclude=exclude)
    assert decay_applies("dense/bias_keep", weight_decay=0.1, include=include, exclude=exclude)
    assert not decay_applies("dense/kernel", weight_decay=0.0, include=include, exclude=exclude)


# transformers' own rule (Trainer.get_decay_parameter_names) on real architectures


def _bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    return BertModel(config)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=2, n_head=2, n_positions=16))


@pytest.mark.parametrize("build", [_bert, _llama, _gpt2], ids=["bert", "llama", "gpt2"])
def test_matches_transformers_trainer_rule(build):
    from transformers import Trainer

    torch.manual_seed(0)
    model = build()
    expected = Trainer.get_decay_parameter_names(None, model)  # the method does not use self
    ours = get_decay_parameter_names(model)
    assert ours == [n for n, _ in model.named_parameters() if n in set(expected)]
    assert set(ours) == set(expected) & {n for n, _ in model.named_parameters()}
    assert any("norm" in n.lower() or "ln_" in n for n in get_no_decay_parameter_names(model))
