"""A process killed (SIGKILL) while saving never leaves a half-written checkpoint that ``load_state`` accepts.

A child process saves continuously into one directory, each save with every value set to its iteration number
(optimizer state, step counters, scheduler position, accumulator) and alternating between one file and several
shards. The parent kills it at random moments; after each kill ``load_state`` must load a checkpoint whose
values all agree and equal the last completed save or the one in progress; never a mix, never an unclear error.
The next child then saves over the debris of the killed one.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import hf_optim

SETUP = textwrap.dedent(
    """
    import torch, hf_optim

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 1000))
        opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
        sched = hf_optim.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10**6)
        acc = hf_optim.GradientAccumulator()
        return model, opt, sched, acc
    """
)

CHILD = SETUP + textwrap.dedent(
    """
    import sys
    model, opt, sched, acc = build()
    model(torch.ones(2, 1000)).sum().backward()
    opt.step()
    acc([p.grad for p in model.parameters()])
    directory = sys.argv[1]
    i = int(sys.argv[2])
    while True:
        with torch.no_grad():
            for st in opt.state.values():
                for t in st.values():
                    t.fill_(i)
        sched.last_epoch = i
        acc.load_state_dict({"gradients": [torch.full_like(p, i) for p in model.parameters()], "step": i,
                             "num_items": 0})
        hf_optim.save_state(directory, opt, sched, acc, max_shard_size="5GB" if i % 2 else "5MB")
        print(i, flush=True)
        i += 1
    """
)


def loaded_value(directory: str) -> int:
    namespace: dict = {}
    exec(SETUP, namespace)
    _model, opt, sched, acc = namespace["build"]()
    hf_optim.load_state(directory, opt, sched, acc)
    values = {float(t.reshape(-1)[0]) for st in opt.state.values() for t in st.values()}
    values |= {float(t.min()) for st in opt.state.values() for t in st.values()}
    values |= {float(t.max()) for st in opt.state.values() for t in st.values()}
    values |= {float(g.min()) for g in acc.gradients} | {float(g.max()) for g in acc.gradients}
    values |= {float(sched.last_epoch), float(acc.step)}
    assert len(values) == 1, f"mixed checkpoint: {sorted(values)}"
    assert len(opt.state) == 4
    return int(values.pop())


@pytest.mark.timeout(600)
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_saves_leave_a_loadable_checkpoint(tmp_path):
    directory = str(tmp_path / "ckpt")
    rng = random.Random(20240531)
    start = 1
    mid_save_kills = 0
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, directory, str(start)], stdout=subprocess.PIPE, text=True
        )
        try:
            first = child.stdout.readline()  # a first complete save, then kill at a random moment
            assert first.strip() == str(start), f"child failed: {first!r}"
            time.sleep(rng.uniform(0.0, 0.3))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(n.endswith(".tmp") for n in os.listdir(directory)):
                time.sleep(0.001)  # wait until a save is writing its temporary files ...
            # ... then kill somewhere in writing, renaming or cleaning up (a save of this size takes milliseconds)
            time.sleep(rng.uniform(0.0, 0.004))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            out, _ = child.communicate()
        completed = [int(line) for line in [first, *out.splitlines()] if line.strip()]
        last = completed[-1]
        debris = [n for n in os.listdir(directory) if n.startswith(".")]
        mid_save_kills += bool(debris)
        value = loaded_value(directory)
        assert value in (last, last + 1), f"loaded save {value}, last completed {last}"
        start = last + 2
    assert mid_save_kills >= 1, "no kill landed in the middle of a save"
    # after all this, a normal save cleans up the debris
    namespace: dict = {}
    exec(SETUP, namespace)
    _model, opt, sched, acc = namespace["build"]()
    hf_optim.save_state(directory, opt, sched, acc)
    assert not [n for n in os.listdir(directory) if n.startswith(".")]
    assert hf_optim.load_state(directory, opt, sched, acc).complete
