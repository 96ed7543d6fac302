"""``hf-optim list`` and ``hf-optim plot``: output against the registry and hand-computed learning rates."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from hf_optim.cli.main import main
from hf_optim.cli.plot_cmd import draw_figure, parse_schedule, schedule_lrs, text_plot


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------------------
# list
# ----------------------------------------------------------------------------------------------------------------


def test_list_shows_every_entry_with_its_description(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    from hf_optim.integrations.transformers import registered_names

    # hf_optim's four optimizers plus transformers' own names: its handler table without the names hf_optim added
    # (its four, and those earlier tests registered)
    transformers_own = {k.value for k in _OPTIMIZER_HANDLERS} - set(registered_names()["optimizers"])
    assert f"Optimizers ({len(transformers_own) + 4}):" in out and "Schedules (10):" in out
    lines = out.splitlines()
    for name, words in (
        ("adamw_hf", "[hf_optim] AdamW of transformers 4.x"),
        ("adam_weight_decay", "[hf_optim] AdamWeightDecay of transformers 4.x TF"),
        ("bert_adam", "[hf_optim] BertAdam of pytorch-pretrained-bert"),
        ("openai_adam", "[hf_optim] OpenAIAdam of pytorch-pretrained-bert"),
        ("adamw_torch", "[transformers] "),
        ("linear", "linear warmup, then linear decay to 0"),
        ("warmup_stable_decay", "warmup, constant phase"),
    ):
        assert any(line.split()[0] == name and words in line for line in lines if line.strip()), name


def test_list_filters_and_json(capsys):
    code, out, _ = run_cli(capsys, "list", "--schedulers", "cosine_with*", "--json")
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["schedulers"]
    assert [e["name"] for e in data["schedulers"]] == ["cosine_with_min_lr", "cosine_with_restarts"]
    restarts = data["schedulers"][1]
    assert restarts["arguments"] == ["num_warmup_steps", "num_training_steps", "num_cycles=1.0"]

    code, out, _ = run_cli(capsys, "list", "--optimizers", "-v")
    assert "renames: lr -> learning_rate, weight_decay -> weight_decay_rate, betas -> beta_1/beta_2" in out
    assert "Schedules" not in out

    code, out, _ = run_cli(capsys, "list", "--optimizers", "--source", "hf_optim", "--json")
    assert [(e["name"], e["source"]) for e in json.loads(out)["optimizers"]] == [
        ("adam_weight_decay", "hf_optim"),
        ("adamw_hf", "hf_optim"),
        ("bert_adam", "hf_optim"),
        ("openai_adam", "hf_optim"),
    ]
    code, out, _ = run_cli(capsys, "list", "--optimizers", "--source", "transformers", "sgd", "--json")
    assert [(e["name"], e["source"]) for e in json.loads(out)["optimizers"]] == [("sgd", "transformers")]


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "hf-optim")
    result = subprocess.run([script, "list", "--optimizers"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "adamw_hf" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# plot: values
# ----------------------------------------------------------------------------------------------------------------


def test_plot_json_gives_the_schedule_values(capsys):
    code, out, _ = run_cli(
        capsys,
        "plot",
        "linear",
        "cosine_with_restarts:num_cycles=2",
        "--num-warmup-steps",
        "2",
        "--num-training-steps",
        "10",
        "--lr",
        "10",
        "--json",
    )
    assert code == 0
    curves = json.loads(out)["curves"]
    assert curves["linear"] == pytest.approx([0, 5, 10, 8.75, 7.5, 6.25, 5, 3.75, 2.5, 1.25, 0], abs=1e-12)
    # two hard-restart cycles over 8 decay steps: 10 * (1 + cos(pi * ((s - 2) / 4 % 1))) / 2
    assert curves["cosine_with_restarts:num_cycles=2"] == pytest.approx(
        [0, 5, 10, 8.535533905932738, 5, 1.4644660940672627, 10, 8.535533905932738, 5, 1.4644660940672627, 0],
        abs=1e-12,
    )


def test_plot_shared_args_go_to_schedules_that_take_them(capsys):
    code, out, _ = run_cli(
        capsys,
        "plot",
        "cosine_with_min_lr",
        "linear",
        "--arg",
        "min_lr_rate=0.5",
        "--num-training-steps",
        "4",
        "--lr",
        "1",
        "--json",
    )
    assert code == 0
    curves = json.loads(out)["curves"]
    assert curves["cosine_with_min_lr"][-1] == pytest.approx(0.5)
    assert curves["linear"] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_parse_schedule_reads_json_values():
    assert parse_schedule("warmup_stable_decay:num_decay_steps=3,decay_type=1-sqrt,min_lr_ratio=0.1") == (
        "warmup_stable_decay",
        {"num_decay_steps": 3, "decay_type": "1-sqrt", "min_lr_ratio": 0.1},
    )
    assert parse_schedule("inverse_sqrt:timescale=null") == ("inverse_sqrt", {"timescale": None})


# ----------------------------------------------------------------------------------------------------------------
# plot: drawing
# ----------------------------------------------------------------------------------------------------------------


def test_text_plot_layout():
    # constant at the top row, linear decay from top-left to bottom-right
    chart = text_plot(
        {"a": [1.0] * 21, "b": [1 - s / 20 for s in range(21)]}, width=20, height=5
    ).splitlines()
    rows = chart[:5]
    assert len(chart) == 8  # 5 rows, axis, step labels, legend
    assert rows[0].split("|")[0].strip() == "1" and rows[-1].split("|")[0].strip() == "0"
    assert rows[2].split("|")[0].strip() == "0.5"
    body = [row.split("|", 1)[1].ljust(20) for row in rows]
    assert body[0] == "*" * 20  # "a" is drawn over "b" where they meet
    assert body[-1][-1] == "o" and body[-1][0] == " "
    # "b" descends: each lower row holds some "o", starting no further left than the row above
    starts = [body[r].index("o") for r in range(1, 5)]
    assert starts == sorted(starts) and starts[0] > 0
    assert chart[5].endswith("+" + "-" * 20)
    assert chart[6].split() == ["0", "20", "step"]
    assert chart[7].split() == ["*", "a", "o", "b"]


def test_plot_prints_text_without_output(capsys):
    code, out, _ = run_cli(
        capsys, "plot", "cosine", "--num-warmup-steps", "10", "--num-training-steps", "100", "--height", "8"
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 8 + 3
    assert lines[0].split("|")[0].strip() == "5e-05"
    assert "* cosine" in lines[-1]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # a dev dependency: present in the test environment
    output = tmp_path / "lr.png"
    code, out, _ = run_cli(
        capsys,
        "plot",
        "cosine",
        "linear",
        "--num-warmup-steps",
        "10",
        "--num-training-steps",
        "100",
        "--output",
        str(output),
    )
    assert code == 0 and out == ""
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def segment_hits_box(p: tuple[float, float], q: tuple[float, float], box) -> bool:
    """Whether the segment p-q meets the rectangle ``box`` (x0, y0, x1, y1), by Liang-Barsky clipping."""
    (x, y), (dx, dy) = p, (q[0] - p[0], q[1] - p[1])
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, x - box[0]), (dx, box[2] - x), (-dy, y - box[1]), (dy, box[3] - y)):
        if pk == 0:
            if qk < 0:  # parallel to this edge and outside it
                return False
        elif pk < 0:
            t0 = max(t0, qk / pk)
        else:
            t1 = min(t1, qk / pk)
    return t0 <= t1


def lines_crossing(figure, box) -> list[str]:
    """Labels of the figure's data lines with a segment, in display coordinates, inside ``box`` (a Bbox)."""
    rect = (box.x0, box.y0, box.x1, box.y1)
    hits = []
    for ax in figure.axes:
        for line in ax.get_lines():
            points = line.get_transform().transform(line.get_xydata())
            if any(segment_hits_box(a, b, rect) for a, b in itertools.pairwise(points)):
                hits.append(line.get_label())
    return hits


def test_segment_hits_box():
    box = (0, 0, 10, 10)
    assert segment_hits_box((-5, 5), (15, 5), box)  # crosses with both ends outside
    assert segment_hits_box((5, 5), (6, 6), box)  # inside
    assert segment_hits_box((-1, 11), (11, -1), box)  # the diagonal
    assert not segment_hits_box((-1, 12), (12, 11), box)  # passes above the corner
    assert not segment_hits_box((11, 0), (11, 10), box)  # parallel, outside
    assert not segment_hits_box((-3, 4), (-1, 9), box)


@pytest.mark.parametrize(
    "schedules",
    [
        # restarts rise to the peak at the right end, where a "best" legend used to sit
        ["cosine", "linear", "cosine_with_restarts:num_cycles=3"],
        ["constant"],  # a flat line at the top
        ["polynomial:power=0.5", "inverse_sqrt", "constant_with_warmup"],
    ],
)
def test_plot_legend_covers_no_curve(schedules):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    curves = {}
    for spec in schedules:
        name, kwargs = parse_schedule(spec)
        curves[spec] = schedule_lrs(name, lr=1e-3, num_warmup_steps=10, num_training_steps=100, kwargs=kwargs)
    figure = draw_figure(curves, num_warmup_steps=10, lr=1e-3)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # lays the figure out (constrained layout), as saving it does
    legends = figure.legends + [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    labels = [text.get_text() for text in legends[0].get_texts()]
    assert labels == [*schedules, "end of warmup"]
    # the check can fail: the curves do cross the axes' own box, in the same coordinates
    assert set(lines_crossing(figure, figure.axes[0].get_window_extent(renderer))) == set(labels)
    assert lines_crossing(figure, legends[0].get_window_extent(renderer)) == []


def test_plot_without_matplotlib_falls_back_to_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" raise ImportError
    output = tmp_path / "lr.png"
    code, out, err = run_cli(capsys, "plot", "linear", "--num-training-steps", "50", "--output", str(output))
    assert code == 0
    assert "matplotlib is not installed" in err and "hf_optim[plot]" in err
    assert "* linear" in out
    assert not output.exists()


# ----------------------------------------------------------------------------------------------------------------
# plot: errors (exit code 2 with the message on stderr)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plot", "cosin", "--num-training-steps", "10"], "Did you mean 'cosine'"),
        (["plot", "linear", "--num-training-steps", "10", "--arg", "num_cycles=2"], "--arg num_cycles"),
        (["plot", "linear", "--num-training-steps", "10", "--arg", "oops"], "expected KEY=VALUE"),
        (
            ["plot", "polynomial", "--num-warmup-steps", "10", "--num-training-steps", "10"],
            "num_warmup_steps",
        ),
        (["plot", "linear", "--num-training-steps", "0"], "--num-training-steps"),
        (["plot", "warmup_stable_decay", "--num-training-steps", "10"], "num_decay_steps"),
        (["plot", "linear:num_cycles=3", "--num-training-steps", "10"], "num_cycles"),
    ],
)
def test_plot_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.startswith("hf-optim plot: error:")
