"""Adaptive runs checkpoint their state and, stopped anywhere (Ctrl-C, SIGTERM, a requeue's
sys.exit, a kill), resume to exactly the numbers of an uninterrupted run; a checkpoint made
with other settings, or damaged, is not used."""

import io
import json

import pytest
import test_adaptation
import torch
from rich.console import Console

from tintcli.adaptation import BatchStream, Checkpoint
from tintcli.adaptation.checkpoints import split
from tintcli.adaptation.tinting import Tinting
from tintcli.errors import Terminated
from tintcli.methods import adapt

bench = test_adaptation.bench  # the tiny zoo's Workbench (a fixture)

EVERY = 2  # checkpoint every 2 steps
# 3 tasks of 48 images: each task's batches run through a new permutation every 2 batches
# (Tinting: every 2 epochs) or every 3 (AdaMerging, every 3 steps)
CASES = {
    "tinting": ("tinting", {"epochs": 3, "sampler": "confidence", "batch_size": 24}),
    "tinting-module": ("tinting", {"epochs": 3, "sampler": "confidence", "batch_size": 24,
                                   "tint": "blocks.1.mlp.fc2"}),
    "adamerging": ("adamerging", {"steps": 7, "batch_size": 16}),
    "adamerging++": ("adamerging", {"steps": 7, "batch_size": 16, "ties_top_k": 20}),
}
# how a run is stopped: (what raises, at which report's step or which encoder forward, what it
# raises, the step it resumes from). Tinting reports once per epoch (3 task-steps) and runs the
# encoder once per step; AdaMerging reports every step and runs the encoder once per task.
STOPS = {
    "tinting": {
        "at a checkpoint": ("report", 6, KeyboardInterrupt, 6),
        "between checkpoints": ("report", 3, SystemExit, 3),
        "mid-step": ("forward", 4, Terminated, 3),   # step 4, after its batch was drawn
        "killed": ("kill", 3, KeyboardInterrupt, 2),  # nothing saved on the way out
    },
    "adamerging": {
        "at a checkpoint": ("report", 4, KeyboardInterrupt, 4),
        "between checkpoints": ("report", 3, SystemExit, 3),
        "mid-step": ("forward", 11, Terminated, 3),  # step 4's second task
        "killed": ("kill", 3, KeyboardInterrupt, 2),
    },
}


def run(bench, case: str, folder=None, key: dict | None = None, stop=None):
    """The case's method on the tiny zoo, checkpointed in ``folder``; ``stop`` = (what, at,
    exception) raises there. Returns the outcome and the notes printed."""
    method, params = CASES[case]
    context = bench.adaptation_context(seed=0)
    context.checkpoint_dir, context.checkpoint_every = folder, EVERY
    context.checkpoint_key = key or {"config": "a"}
    context.console = Console(file=io.StringIO(), width=300)
    context.expert_logits(bench.experts)  # before any hook: the experts run on a copy
    handle = None
    if stop is not None:
        what, at, raised = stop
        if what == "forward":
            forwards = []

            def hook(module, inputs, output):
                forwards.append(1)
                if len(forwards) == at:
                    raise raised()

            handle = context.encoder.register_forward_hook(hook)
        else:
            def on_step(done, total, loss, lambdas):
                if done == at:
                    raise raised()

            context.on_step = on_step
    try:
        adapted = adapt(method, bench.pretrained, bench.experts, context, **params)
    finally:
        if handle is not None:
            handle.remove()
    return numbers(adapted), context.console.file.getvalue()


def numbers(adapted) -> dict:
    out = {"lambdas": adapted.lambdas, "curve": adapted.loss_curve["loss"]}
    for task in adapted.tasks:
        out |= {f"head.{task}.{k}": v for k, v in adapted.heads[task].state_dict().items()}
        out |= {f"tint.{task}.{k}": v for k, v in adapted.tints.get(task, {}).items()}
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        same = torch.equal(got[name], value) if torch.is_tensor(value) else got[name] == value
        assert same, name


@pytest.fixture(scope="module")
def uninterrupted(bench):
    return {case: run(bench, case)[0] for case in CASES}


def stopped(bench, case, folder, stop, monkeypatch, key=None):
    """Run the case until ``stop``; a "kill" keeps only the periodic checkpoints."""
    what, at, raised = stop
    if what == "kill":
        save = Checkpoint.save
        monkeypatch.setattr(Checkpoint, "save", lambda self, state, step: (
            save(self, state, step) if step % EVERY == 0 else None))
    with pytest.raises(raised):
        run(bench, case, folder, key, ("report" if what == "kill" else what, at, raised))
    monkeypatch.undo()


@pytest.mark.parametrize("stop", ["at a checkpoint", "between checkpoints", "mid-step",
                                  "killed"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_run_resumes_to_the_uninterrupted_runs_numbers(
        bench, uninterrupted, tmp_path, monkeypatch, case, stop):
    what, at, raised, resumes_from = STOPS[CASES[case][0]][stop]
    folder = tmp_path / "checkpoints" / case
    stopped(bench, case, folder, (what, at, raised), monkeypatch)
    assert (folder / "checkpoint.json").is_file()
    assert json.loads((folder / "checkpoint.json").read_text())["steps_done"] == resumes_from
    outcome, notes = run(bench, case, folder)
    assert f"resuming from step {resumes_from} " in notes
    assert_same(outcome, uninterrupted[case])
    assert not folder.exists()  # done: its checkpoint is gone


def test_checkpointing_changes_no_number(bench, uninterrupted, tmp_path):
    outcome, notes = run(bench, "tinting", tmp_path / "checkpoint")
    assert_same(outcome, uninterrupted["tinting"])
    assert notes == "" and not (tmp_path / "checkpoint").exists()


def test_a_checkpoint_made_with_other_settings_is_not_resumed(
        bench, uninterrupted, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    stopped(bench, "adamerging", folder, ("report", 3, KeyboardInterrupt), monkeypatch,
            key={"config": "a", "lr": 1})
    outcome, notes = run(bench, "adamerging", folder, key={"config": "a", "lr": 2})
    assert notes.startswith(f"note: not resuming from {folder}: that checkpoint was made with "
                            "other settings (run.lr); starting afresh")
    assert_same(outcome, uninterrupted["adamerging"])


def truncate(folder):
    path = next(folder.glob("state-*.safetensors"))
    path.write_bytes(path.read_bytes()[:-50])


def flip_a_byte(folder):
    path = next(folder.glob("state-*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def edit(change):
    def damage(folder):
        info = json.loads((folder / "checkpoint.json").read_text())
        change(info)
        (folder / "checkpoint.json").write_text(json.dumps(info))
    return damage


@pytest.mark.parametrize("damage", [
    truncate,
    flip_a_byte,
    lambda folder: next(folder.glob("state-*.safetensors")).unlink(),
    lambda folder: (folder / "checkpoint.json").write_text('{"key": '),
    lambda folder: (folder / "checkpoint.json").write_text("[]"),
    edit(lambda info: info.pop("state")),
    # loads in part (lambda, Adam) before a stream's position is refused: back to the start
    edit(lambda info: info["state"]["progress"]["streams"]["digits"].update(position=99)),
], ids=["truncated", "flipped byte", "tensors missing", "cut JSON", "JSON of another shape",
        "state missing", "refused half-way"])
def test_a_damaged_checkpoint_is_not_resumed(
        bench, uninterrupted, tmp_path, monkeypatch, damage):
    folder = tmp_path / "checkpoint"
    stopped(bench, "adamerging", folder, ("report", 4, KeyboardInterrupt), monkeypatch)
    damage(folder)
    outcome, notes = run(bench, "adamerging", folder)
    assert notes.startswith(f"note: not resuming from the damaged checkpoint in {folder} (")
    assert notes.rstrip().endswith("); starting afresh") and notes.count("\n") == 1
    assert_same(outcome, uninterrupted["adamerging"])


def test_a_checkpoint_that_cannot_be_written_is_noted_once_and_the_run_goes_on(
        bench, uninterrupted, tmp_path):
    (tmp_path / "file").write_text("")
    outcome, notes = run(bench, "adamerging", tmp_path / "file" / "checkpoint")
    assert notes.startswith("note: cannot save a checkpoint in") and notes.count("\n") == 1
    assert_same(outcome, uninterrupted["adamerging"])


def test_a_checkpoint_holds_the_whole_state(bench, tmp_path):
    """Every part of a run's state comes back, the loss scale too (CPU runs, in fp32, never
    scale it: here it is on and grows at every step, as an fp16 run's does every 2000)."""
    def tinting(scale: float) -> Tinting:
        run = Tinting(bench.pretrained, bench.experts, bench.adaptation_context(seed=0),
                      "blocks.1.mlp.fc2", "confidence", batch_size=16)
        run.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
        return run

    run, notes = tinting(1024.0), []
    for _ in range(4):  # mid-epoch, past a wrap of the batch streams
        run.advance()
    Checkpoint(tmp_path, {"key": 1}, notes.append).save(run.state(), run.steps_done)
    resumed = tinting(1.0)
    assert Checkpoint(tmp_path, {"key": 1}, notes.append).resume(resumed)
    assert notes == [f"resuming from step 4 (checkpoint in {tmp_path})"]
    (tree, tensors), (expected_tree, expected) = split(resumed.state()), split(run.state())
    assert tree == expected_tree and tree["learned"]["scaler"]["scale"] > 1024.0
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())


def test_batch_streams_draw_what_the_generator_they_replace_drew():
    def before(count, batch_size, generator):  # the generator function BatchStream replaced
        batch_size = min(batch_size, count)
        while True:
            order = torch.randperm(count, generator=generator)
            for i in range(0, count - batch_size + 1, batch_size):
                yield order[i : i + batch_size]

    for count, batch_size in [(48, 16), (50, 16), (10, 32)]:
        ours, theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        stream, reference = BatchStream(count, batch_size, ours), before(count, batch_size, theirs)
        for _ in range(10):
            assert torch.equal(next(stream), next(reference))
