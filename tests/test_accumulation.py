"""GradientAccumulator: the TF API (ported test of transformers 4.x), exact item normalisation against the full
batch (the 2024 gradient-accumulation bug), checkpoints taken mid-accumulation, and errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hf_optim import GradientAccumulator

# ----------------------------------------------------------------------------------------------------------------
# The TF API
# ----------------------------------------------------------------------------------------------------------------


def test_tf_gradient_accumulator_semantics():
    """transformers 4.x tests/optimization/test_optimization_tf.py::test_gradient_accumulator, in torch."""
    accumulator = GradientAccumulator()
    accumulator([torch.tensor([1.0, 2.0])])
    accumulator([torch.tensor([-2.0, 1.0])])
    accumulator([torch.tensor([-1.0, 2.0])])
    with pytest.raises(ValueError, match="Expected 1 gradients, but got 2"):
        accumulator([torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])])
    assert accumulator.step == 3
    assert len(accumulator.gradients) == 1
    assert accumulator.gradients[0].tolist() == [-2.0, 5.0]
    accumulator.reset()
    assert accumulator.step == 0
    assert accumulator.gradients[0].tolist() == [0.0, 0.0]


def test_gradients_before_first_call_raise():
    with pytest.raises(ValueError, match="called first"):
        _ = GradientAccumulator().gradients


def test_none_slots_and_no_aliasing_of_inputs():
    acc = GradientAccumulator()
    a = torch.tensor([1.0, 1.0])
    acc([a, None])
    a.add_(100.0)  # the caller's tensor is not the buffer
    acc([torch.tensor([2.0, 3.0]), None])
    acc([None, torch.tensor([5.0])])  # a slot that was None starts accumulating (TF would drop it)
    assert acc.step == 3
    assert acc.gradients[0].tolist() == [3.0, 4.0]
    assert acc.gradients[1].tolist() == [5.0]
    with pytest.raises(ValueError, match="shape"):
        acc([torch.zeros(3), None])
    with pytest.raises(TypeError, match="tensor or None"):
        acc([[1.0, 2.0], None])
    assert acc.step == 3  # rejected calls change nothing


# ----------------------------------------------------------------------------------------------------------------
# Item normalisation: exactly the full-batch gradient
# ----------------------------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.embed(tokens))))


def micro_batches(seed: int = 0):
    """3 micro-batches of padded sequences with very unequal numbers of real tokens (3, 29, 9)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length, real in ((1, 6, [3]), (3, 12, [12, 9, 8]), (2, 8, [8, 1])):
        tokens = torch.randint(0, 11, (rows, length), generator=g)
        labels = torch.randint(0, 11, (rows, length), generator=g)
        for r, n in enumerate(real):
            labels[r, n:] = -100  # padding
        batches.append((tokens, labels))
    return batches


def full_batch_grads(model: nn.Module, batches) -> list[torch.Tensor]:
    """Reference: the mean token loss over all micro-batches at once, one backward."""
    model.zero_grad()
    logits = torch.cat([model(t).reshape(-1, 11) for t, _ in batches])
    labels = torch.cat([lab.reshape(-1) for _, lab in batches])
    F.cross_entropy(logits, labels, ignore_index=-100, reduction="mean").backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_item_normalisation_equals_the_full_batch_gradient():
    torch.manual_seed(0)
    model = TinyLM().double()
    batches = micro_batches()
    reference = full_batch_grads(model, batches)

    acc = GradientAccumulator()
    for tokens, labels in batches:
        loss = F.cross_entropy(
            model(tokens).reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss.backward()
        acc.accumulate_from(model, num_items=(labels != -100).sum())
        assert all(p.grad is None for p in model.parameters())  # ready for the next micro-batch
    assert acc.step == 3 and acc.num_items == 3 + 29 + 9
    acc.apply_to(model, normalize="items")
    for p, ref in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=0, atol=1e-14)
    assert acc.step == 0 and acc.num_items == 0  # reset for the next optimizer step


def test_averaging_micro_batch_means_is_the_2024_bug():
    """Per-micro-batch mean losses normalised by steps over-weight the 3-token batch: not the full gradient."""
    torch.manual_seed(0)
    model = TinyLM().double()
    batches = micro_batches()
    reference = full_batch_grads(model, batches)
    acc = GradientAccumulator()
    separate = []
    for tokens, labels in batches:
        F.cross_entropy(model(tokens).reshape(-1, 11), labels.reshape(-1), ignore_index=-100).backward()
        separate.append([p.grad.clone() for p in model.parameters()])
        acc.accumulate_from(model)
    acc.apply_to(model, normalize="steps")
    # "steps" is the plain mean of the per-micro-batch gradients (written out)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(
            p.grad, (separate[0][i] + separate[1][i] + separate[2][i]) / 3, rtol=0, atol=1e-14
        )
    worst = max(
        (p.grad - ref).abs().max().item() for p, ref in zip(model.parameters(), reference, strict=True)
    )
    assert worst > 1e-3


def test_item_normalisation_with_a_global_count_and_no_normalisation():
    acc = GradientAccumulator()
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    for grad, n in (([1.0, 2.0], 3), ([3.0, 6.0], 5)):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        acc.accumulate_from([p], num_items=n)
    acc.apply_to([p], normalize="items", num_items=16, reset=False)  # e.g. items over all processes
    assert p.grad.tolist() == [4.0 / 16, 8.0 / 16]
    acc.apply_to([p], normalize="items", reset=False)
    assert p.grad.tolist() == [4.0 / 8, 8.0 / 8]
    acc.apply_to([p], normalize=None, reset=False)
    assert p.grad.tolist() == [4.0, 8.0]
    assert acc.gradients[0].tolist() == [4.0, 8.0]  # reset=False writes copies
    p.grad.zero_()
    assert acc.gradients[0].tolist() == [4.0, 8.0]


def test_accumulate_in_float32_for_bfloat16_parameters():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    grads = [torch.tensor([1.0, 2.0**-9, 3.0, -1.0], dtype=torch.bfloat16) for _ in range(4)]
    acc = GradientAccumulator(dtype=torch.float32)
    for g in grads:
        p.grad = g.clone()
        acc.accumulate_from([p])
    assert acc.gradients[0].dtype == torch.float32
    expected = sum(g.float() for g in grads)  # 4 * 2**-9 is exact in float32 (bf16 adds would round it away)
    assert torch.equal(acc.gradients[0], expected)
    acc.apply_to([p], normalize=None)
    assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, expected.to(torch.bfloat16))


def test_apply_and_accumulate_errors():
    acc = GradientAccumulator()
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="nothing to apply"):
        acc.apply_to([p])
    p.grad = torch.ones(2)
    acc.accumulate_from([p])
    with pytest.raises(ValueError, match="num_items passed with every"):
        acc.apply_to([p], normalize="items")
    with pytest.raises(ValueError, match="normalize"):
        acc.apply_to([p], normalize="mean")
    with pytest.raises(ValueError, match="Expected 1 parameters, but got 2"):
        acc.apply_to([p, nn.Parameter(torch.zeros(1))])
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="all accumulated micro-steps or for none"):
        acc.accumulate_from([p], num_items=4)
    with pytest.raises(ValueError, match="num_items"):
        GradientAccumulator()([torch.ones(1)], num_items=-1)
    with pytest.raises(ValueError, match="dtype"):
        GradientAccumulator(dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints mid-accumulation
# ----------------------------------------------------------------------------------------------------------------


def _micro_step(model, tokens, labels, acc):
    F.cross_entropy(
        model(tokens).reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum"
    ).backward()
    acc.accumulate_from(model, num_items=int((labels != -100).sum()))


def test_checkpoint_mid_accumulation_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    model.proj.bias.requires_grad_(False)  # a parameter without gradient: a None slot in the state
    batches = micro_batches(1) + micro_batches(2)[:1]

    uninterrupted = GradientAccumulator()
    for tokens, labels in batches:
        _micro_step(model, tokens, labels, uninterrupted)
    uninterrupted.apply_to(model, normalize="items")
    expected = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    acc = GradientAccumulator()
    for tokens, labels in batches[:2]:
        _micro_step(model, tokens, labels, acc)
    state = acc.state_dict()
    assert state["step"] == 2 and state["gradients"][2] is None
    # save like a checkpoint would: tensors in safetensors, the rest as JSON
    save_file(
        {str(i): g.contiguous() for i, g in enumerate(state["gradients"]) if g is not None},
        tmp_path / "acc.safetensors",
    )
    (tmp_path / "acc.json").write_text(
        json.dumps({"n": len(state["gradients"]), "step": state["step"], "num_items": state["num_items"]})
    )
    del acc

    meta = json.loads((tmp_path / "acc.json").read_text())
    tensors = load_file(tmp_path / "acc.safetensors")
    restored = GradientAccumulator()
    restored.load_state_dict(
        {
            "gradients": [tensors.get(str(i)) for i in range(meta["n"])],
            "step": meta["step"],
            "num_items": meta["num_items"],
        }
    )
    for tokens, labels in batches[2:]:
        _micro_step(model, tokens, labels, restored)
    restored.apply_to(model, normalize="items")
    for p, ref in zip(model.parameters(), expected, strict=True):
        if ref is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, ref)


def test_failed_load_changes_nothing():
    acc = GradientAccumulator()
    acc([torch.tensor([1.0, 2.0]), None], num_items=3)
    before = acc.state_dict()
    snapshot = [g.clone() for g in before["gradients"] if g is not None]
    bad_states = [
        {"gradients": [torch.zeros(2)], "step": 1, "num_items": 0},  # wrong length
        {"gradients": [torch.zeros(2), None], "step": -1, "num_items": 0},
        {"gradients": [torch.zeros(2), None], "step": 1.5, "num_items": 0},
        {"gradients": [torch.zeros(2), "x"], "step": 1, "num_items": 0},
        {"gradients": torch.zeros(2), "step": 1, "num_items": 0},
        {"gradients": [torch.zeros(2), None], "step": 1},
        "not a mapping",
    ]
    for bad in bad_states:
        with pytest.raises((TypeError, ValueError)):
            acc.load_state_dict(bad)
    assert acc.step == 1 and acc.num_items == 3
    assert torch.equal(acc.gradients[0], snapshot[0]) and acc.gradients[1] is None
    with pytest.raises(ValueError, match=r"gradients'\] is empty"):
        GradientAccumulator().load_state_dict({"gradients": [], "step": 2, "num_items": 0})
