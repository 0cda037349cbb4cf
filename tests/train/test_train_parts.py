"""The trainer's pieces that need no model: configs, the global-batch plan, the LR schedule, checkpoints."""

import json
from dataclasses import dataclass, field

import pytest
import torch

from r4b.config import ConfigError, load_config
from r4b.train.batches import GlobalBatchPlanner
from r4b.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from r4b.train.schedule import module_of, parameter_groups, warmup_cosine


@dataclass
class Inner:
    lr: float = 1e-3
    names: list[str] = field(default_factory=list)
    limit: int | None = None


@dataclass
class Outer:
    out: str = "runs/x"
    inner: Inner = field(default_factory=Inner)


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out: runs/a\ninner:\n  lr: 2\n  names: [a, b]\n")
    config = load_config(Outer, path, ["inner.limit=5", "inner.lr=3e-4"])
    assert config == Outer("runs/a", Inner(3e-4, ["a", "b"], 5))
    assert isinstance(config.inner.lr, float)


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("inner:\n  lrr: 1\n", [], r"run.yaml: unknown key inner.lrr \(known: limit, lr, names\)"),
        ("inner:\n  limit: many\n", [], r"run.yaml: inner.limit = 'many': expected an integer"),
        ("inner: [1]\n", [], r"run.yaml: inner must be a mapping"),
        ("", ["inner.lr"], r"override 'inner.lr': expected key=value"),
        ("inner: {lr: [}\n", [], r"run.yaml: not valid YAML"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, text, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, path, overrides)


def plan_all(planner, steps):
    return [planner.plan(step) for step in range(steps)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_global_batches_cover_each_epoch_once_within_budgets(world_size):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (53,), generator=gen).tolist()
    planner = GlobalBatchPlanner(
        lengths, [n // 2 for n in lengths], global_batch_samples=8, max_tokens=64, world_size=world_size, seed=3
    )
    assert planner.steps_per_epoch == 7
    for epoch in range(2):
        seen = []
        for plan in plan_all(planner, 14)[epoch * 7 : (epoch + 1) * 7]:
            assert plan.epoch == epoch and len(plan.micro_batches) == world_size
            ids = [i for rank in plan.micro_batches for micro in rank for i in micro]
            assert all(sum(lengths[i] for i in micro) <= 64 for rank in plan.micro_batches for micro in rank)
            assert plan.tokens == sum(lengths[i] for i in ids)
            assert plan.loss_tokens == sum(lengths[i] // 2 for i in ids)
            seen += ids
        assert sorted(seen) == list(range(53))


def test_global_batches_depend_only_on_seed_and_step():
    lengths = list(range(1, 30))
    make = lambda seed, world=1: GlobalBatchPlanner(
        lengths, lengths, global_batch_samples=5, max_tokens=40, seed=seed, world_size=world
    )
    assert make(1).plan(9) == make(1).plan(9)
    assert plan_all(make(1), 12) != plan_all(make(2), 12)
    one, two = make(1), make(1, world=2)
    for step in range(12):  # the same global batch whatever the number of processes
        flat = lambda plan: sorted(i for rank in plan.micro_batches for m in rank for i in m)
        assert flat(one.plan(step)) == flat(two.plan(step))


def test_over_long_sample_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sample 1 has 50 tokens, over the budget of 40"):
        GlobalBatchPlanner([3, 50], [1, 1], global_batch_samples=2, max_tokens=40)


def test_warmup_cosine():
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)


def test_parameter_groups_by_module():
    model = torch.nn.ModuleDict(
        {
            "vision_tower": torch.nn.Linear(2, 2),
            "multi_modal_projector": torch.nn.Linear(2, 2),
            "language_model": torch.nn.Linear(2, 2),
        }
    )
    groups = parameter_groups(model, {"vision": 1.0, "projector": 2.0, "llm": 3.0}, ["projector", "llm"])
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("projector", 2.0, 2), ("llm", 3.0, 2)]
    assert not model["vision_tower"].weight.requires_grad
    assert module_of("model.visual.merger.mlp.0.weight") == "projector" and module_of("model.visual.x") == "vision"


class FakeEngine:
    """Stands in for an engine's save/load (the engines are tested in test_engine.py)."""

    def __init__(self, value):
        self.value = value

    def save(self, path):
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps(self.value))

    def load(self, path):
        self.value = json.loads((path / "state.json").read_text())


def test_checkpoints_are_atomic_resume_restores_rng_and_old_ones_are_pruned(tmp_path):
    for step in (1, 2, 3):
        torch.manual_seed(step)
        save_checkpoint(tmp_path, step, FakeEngine(step), {"epoch": 0}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    # a save that died half way leaves a partial directory that resume never picks
    (tmp_path / ".checkpoint-4.partial" / "engine").mkdir(parents=True)
    (tmp_path / "checkpoint-5").mkdir()  # no trainer_state.json: incomplete
    assert list_checkpoints(tmp_path)[-1].name == "checkpoint-3"
    expected = torch.manual_seed(3) and torch.rand(3)
    torch.manual_seed(99)
    engine = FakeEngine(None)
    state = load_checkpoint(list_checkpoints(tmp_path)[-1], engine)
    assert state == {"step": 3, "epoch": 0} and engine.value == 3
    assert torch.equal(torch.rand(3), expected)


def test_padding_micro_batch_is_the_shortest_sample_on_every_rank():
    """A rank with fewer micro-batches pads with a zero-weight pass over one sample: the global batch's shortest
    (lowest index among equals), whichever rank asks, not whatever sample comes first."""
    from r4b.train.batches import StepPlan
    from r4b.train.sft import padding_sample

    lengths = [50, 9, 30, 9, 70]
    plan = StepPlan(step=0, epoch=0, micro_batches=(((0, 4), (2,)), ((3, 1),)), loss_tokens=10, tokens=168)
    assert padding_sample(plan, lengths) == (1,)
    assert padding_sample(StepPlan(0, 0, (((0,), (2,)), ((4,),)), 1, 150), lengths) == (2,)
