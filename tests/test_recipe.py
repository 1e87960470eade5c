"""Recipe comparison at resume: every changed setting gets its documented decision."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

from colabkit.train import recipe
from colabkit.train.recipe import CHECKPOINT, NEW, REFUSE


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))


Factory = Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, Any]]


def adamw(lr: float = 0.1, **kw: Any) -> Factory:
    return lambda m: (torch.optim.AdamW(m.parameters(), lr=lr, **kw), None)


def with_step(lr: float = 0.1, step_size: int = 1, gamma: float = 0.5) -> Factory:
    def build(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)

    return build


def describe(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, **kw: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "batch_size": 8,
        "grad_accum": 1,
        "precision": "fp32",
        "dataset_length": 64,
    }
    options.update(kw)
    return recipe.describe(optimizer=opt, scheduler=sched, model=model, **options)


def train_and_save(factory: Factory, steps: int = 3, **kw: Any) -> dict[str, Any]:
    """A first run: a few steps (scheduler stepped each time), saved the way fit() saves."""
    model = make_model()
    opt, sched = factory(model)
    saved_recipe = describe(model, opt, sched, **kw)
    for _ in range(steps):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    buffer = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": None if sched is None else sched.state_dict(),
        "recipe": saved_recipe,
        "lr_now": [g["lr"] for g in opt.param_groups],
    }
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # the recipe is plain enough for weights_only


def resume(
    checkpoint: dict[str, Any], factory: Factory, **kw: Any
) -> tuple[recipe.Plan, torch.optim.Optimizer, Any, torch.nn.Module]:
    """What resume.py does: describe this call, compare, restore per the plan, apply."""
    model = make_model()
    opt, sched = factory(model)
    current = describe(model, opt, sched, **kw)
    fresh = recipe.group_settings(opt)
    plan = recipe.compare(checkpoint["recipe"], current)
    if plan.refused:
        return plan, opt, sched, model
    model.load_state_dict(checkpoint["model"])
    if plan.restore_optimizer:
        opt.load_state_dict(checkpoint["optimizer"])
    if sched is not None and plan.restore_scheduler and checkpoint["scheduler"] is not None:
        sched.load_state_dict(checkpoint["scheduler"])
    recipe.apply(plan, optimizer=opt, scheduler=sched, fresh=fresh, saved=checkpoint["recipe"])
    return plan, opt, sched, model


def decisions(plan: recipe.Plan) -> dict[str, str]:
    return {change.setting: change.decision for change in plan.changes}


def test_same_recipe_changes_nothing() -> None:
    checkpoint = train_and_save(with_step())
    plan, opt, sched, _ = resume(checkpoint, with_step())
    assert plan.changes == []
    assert [g["lr"] for g in opt.param_groups] == checkpoint["lr_now"]  # exactly as saved
    assert sched.last_epoch == 3


def test_new_lr_without_scheduler_applies_and_keeps_the_moments() -> None:
    checkpoint = train_and_save(adamw(lr=0.001))
    plan, opt, _, _ = resume(checkpoint, adamw(lr=0.1))
    assert decisions(plan) == {"lr": NEW}
    assert "0.001" in plan.changes[0].message() and "0.1" in plan.changes[0].message()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    saved_moment = checkpoint["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], saved_moment)


def test_new_lr_under_a_scheduler_keeps_its_position_scaled() -> None:
    # StepLR halves every step: after 3 steps at base 0.1 the lr is 0.0125.
    checkpoint = train_and_save(with_step(lr=0.1))
    assert checkpoint["lr_now"] == [pytest.approx(0.0125)]
    plan, opt, sched, _ = resume(checkpoint, with_step(lr=0.01))
    assert decisions(plan) == {"lr": NEW}
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.00125)
    assert group["initial_lr"] == pytest.approx(0.01)
    assert sched.base_lrs == [pytest.approx(0.01)]
    assert sched.get_last_lr() == [pytest.approx(0.00125)]
    sched.step()
    assert group["lr"] == pytest.approx(0.000625)  # the schedule goes on from the new base


def test_new_lr_under_a_closed_form_scheduler_moves_its_base() -> None:
    def lam(lr: float) -> Factory:
        def build(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
            opt = torch.optim.SGD(m.parameters(), lr=lr)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)

        return build

    checkpoint = train_and_save(lam(0.1))
    _, opt, sched, _ = resume(checkpoint, lam(0.02))
    sched.step()  # LambdaLR computes base_lr * lambda(epoch) from base_lrs
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**4)


def test_other_optimizer_settings_apply() -> None:
    checkpoint = train_and_save(adamw(weight_decay=0.01, betas=(0.9, 0.999)))
    plan, opt, _, _ = resume(checkpoint, adamw(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6))
    assert decisions(plan) == {"betas": NEW, "eps": NEW, "weight_decay": NEW}
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.1
    assert tuple(group["betas"]) == (0.8, 0.99)
    assert group["eps"] == 1e-6
    checkpoint = train_and_save(with_step())

    def sgd_nesterov(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, nesterov=True)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    plan, opt, _, _ = resume(checkpoint, sgd_nesterov)
    assert decisions(plan) == {"momentum": NEW, "nesterov": NEW}
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["nesterov"] is True
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)  # lr untouched: position kept


def test_a_new_optimizer_class_starts_with_empty_state() -> None:
    checkpoint = train_and_save(adamw(lr=0.01))
    plan, opt, _, _ = resume(checkpoint, lambda m: (torch.optim.SGD(m.parameters(), lr=0.01), None))
    assert decisions(plan) == {"the optimizer": NEW}
    assert not plan.restore_optimizer
    assert "SGD starts with empty state" in plan.changes[0].message()
    assert not opt.state  # nothing of AdamW's moments
    assert opt.param_groups[0]["lr"] == 0.01


def test_a_new_optimizer_class_keeps_the_schedule_position() -> None:
    checkpoint = train_and_save(with_step(lr=0.1))

    def adam_step(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    plan, opt, sched, _ = resume(checkpoint, adam_step)
    assert not plan.restore_optimizer and plan.restore_scheduler
    assert sched.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_a_new_scheduler_class_starts_at_its_beginning() -> None:
    checkpoint = train_and_save(with_step(lr=0.1))

    def cosine(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    plan, opt, sched, _ = resume(checkpoint, cosine)
    assert decisions(plan) == {"the scheduler": NEW}
    assert not plan.restore_scheduler and plan.restore_optimizer
    assert "CosineAnnealingLR starts at its beginning" in plan.changes[0].message()
    assert sched.last_epoch == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # not the StepLR's 0.0125
    assert opt.state  # the optimizer's momentum buffers were restored


def test_a_dropped_scheduler_goes_on_at_the_optimizers_lr() -> None:
    checkpoint = train_and_save(with_step(lr=0.1))
    plan, opt, _, _ = resume(checkpoint, lambda m: (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), None))
    assert decisions(plan) == {"the scheduler": NEW}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_changed_scheduler_settings_keep_the_checkpoints_values() -> None:
    checkpoint = train_and_save(with_step(step_size=1, gamma=0.5))
    plan, _, sched, _ = resume(checkpoint, with_step(step_size=5, gamma=0.9))
    assert decisions(plan) == {"the scheduler's gamma": CHECKPOINT, "the scheduler's step_size": CHECKPOINT}
    assert "checkpoint's value wins" in plan.changes[0].message()
    assert "resume=False or a new checkpoint_dir" in plan.changes[0].message()
    assert (sched.step_size, sched.gamma) == (1, 0.5)  # what the message promised


@pytest.mark.parametrize(
    ("setting", "old", "new"),
    [
        ("batch_size", 8, 16),
        ("grad_accum", 1, 4),
        ("precision", "fp16", "bf16"),
        ("dataset_length", 64, 100),
    ],
)
def test_data_and_step_settings_apply(setting: str, old: Any, new: Any) -> None:
    checkpoint = train_and_save(adamw(), **{setting: old})
    plan, opt, _, _ = resume(checkpoint, adamw(), **{setting: new})
    assert [change.decision for change in plan.changes] == [NEW]
    assert plan.changes[0].saved == old and plan.changes[0].current == new
    assert plan.restore_optimizer and plan.restore_scheduler
    assert plan.restore_scaler == (setting != "precision")
    assert opt.state  # everything else resumed


def test_mid_epoch_notes_say_what_happens_to_the_interrupted_epoch() -> None:
    saved = describe(make_model(), *adamw()(make_model()))
    current = describe(make_model(), *adamw()(make_model()), dataset_length=100, batch_size=16)
    notes = {c.setting: c.note for c in recipe.compare(saved, current, mid_epoch=True).changes}
    assert "same sample position" in notes["batch_size"]
    assert "not in its order" in notes["the training set's length"]
    notes = {c.setting: c.note for c in recipe.compare(saved, current).changes}
    assert "not in its order" not in notes["the training set's length"]


def test_another_model_or_other_param_groups_are_refused() -> None:
    checkpoint = train_and_save(adamw())
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    plan = recipe.compare(checkpoint["recipe"], describe(model, opt, None))
    assert decisions(plan) == {"the model's parameters": REFUSE}
    assert "'0.weight' is [4, 3] there but [5, 3] here" in plan.changes[0].message()

    def two_groups(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        first, second = m[0], m[2]
        return torch.optim.AdamW([{"params": first.parameters()}, {"params": second.parameters()}], lr=0.1), None

    plan, *_ = resume(checkpoint, two_groups)
    assert decisions(plan) == {"the number of optimizer param groups": REFUSE}


def test_per_group_lrs_are_named_by_group() -> None:
    def groups(lr2: float) -> Factory:
        def build(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
            first, second = m[0], m[2]
            params = [{"params": first.parameters()}, {"params": second.parameters(), "lr": lr2}]
            return torch.optim.AdamW(params, lr=0.1), None

        return build

    checkpoint = train_and_save(groups(0.01))
    plan, opt, _, _ = resume(checkpoint, groups(0.05))
    assert decisions(plan) == {"lr (param group 1)": NEW}
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.05)]


def test_samples_to_batches_rounds_down() -> None:
    assert recipe.samples_to_batches(5, 8, 16) == 2  # 40 samples seen: 2 full batches of 16, 8 repeat
    assert recipe.samples_to_batches(5, 16, 8) == 10
    assert recipe.samples_to_batches(5, 8, 8) == 5
    assert recipe.samples_to_batches(0, 8, 16) == 0
    assert recipe.samples_to_batches(5, None, 16) == 5
