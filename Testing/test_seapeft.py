"""SEA-PEFT: utility smoothing, knapsack, controller, first-order estimates, and a real allocation run."""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from PEFTAdaptLib.adapters import freeze_base
from PEFTAdaptLib.seapeft import SeaPeftConfig, SeaPeftHook, build_pool
from PEFTAdaptLib.seapeft.controller import Controller
from PEFTAdaptLib.seapeft.knapsack import Candidate, allocate
from PEFTAdaptLib.seapeft.utility import RobustUtility


def test_ema_and_iqr_match_hand_computed_values():
    utility = RobustUtility(beta=0.5, window=5, iqr_weight=0.25)
    for value in [1, 2, 3, 4, 5]:
        utility.update(value)
    # EMA: 1, 1.5, 2.25, 3.125, 4.0625; inclusive quartiles of those: Q1 = 1.5, median 2.25, Q3 = 3.125
    assert list(utility.history) == [1, 1.5, 2.25, 3.125, 4.0625]
    assert utility.score == pytest.approx(2.25 - 0.25 * (3.125 - 1.5))
    assert utility.uncertainty == pytest.approx(4.0625 - utility.score)
    utility.update(0)  # the window slides: the oldest EMA value leaves
    assert list(utility.history) == [1.5, 2.25, 3.125, 4.0625, 2.03125]


def test_knapsack_respects_the_budget_and_one_variant_per_site_and_family():
    rng = random.Random(0)
    for _ in range(200):
        candidates = []
        for i in range(30):
            active = rng.random() < 0.3
            candidates.append(Candidate(f"u{i}", (f"s{rng.randint(0, 5)}", rng.choice(["lora", "salt"])),
                                        rng.randint(1, 40), rng.uniform(-1, 2), active=active,
                                        locked=active and rng.random() < 0.3))
        budget = rng.randint(10, 200)
        chosen = allocate(candidates, budget)
        by_name = {c.name: c for c in candidates}
        assert sum(by_name[n].cost for n in chosen) <= budget
        keys = [by_name[n].key for n in chosen]
        assert len(keys) == len(set(keys))
        assert all(by_name[n].value > 0 or by_name[n].active for n in chosen)


def test_synthetic_pool_with_known_utilities_is_allocated_optimally():
    rng = random.Random(1)
    for _ in range(50):
        # equal costs: the best set is the top values, one per (site, family) — check against brute force
        candidates = [Candidate(f"u{i}", (f"s{i % 4}", f"f{i % 3}"), 10, rng.uniform(-0.5, 1.0)) for i in range(10)]
        budget = 10 * rng.randint(1, 6)
        chosen = allocate(candidates, budget)

        def total(names):
            return sum(c.value for c in candidates if c.name in names)

        best = max(
            (set(s) for k in range(len(candidates) + 1) for s in itertools.combinations([c.name for c in candidates], k)
             if 10 * k <= budget
             and len({c.key for c in candidates if c.name in s}) == k
             and all(c.value > 0 for c in candidates if c.name in s)),
            key=total,
        )
        assert total(chosen) == pytest.approx(total(best))


def test_a_unit_with_positive_utility_enters_within_the_vote_count():
    controller = Controller(["good", "bad"], votes=3, guard=2)
    utilities = {"good": 0.8, "bad": -0.1}
    for round_ in range(1, 10):
        desired = allocate([Candidate(n, (n, "lora"), 5, v, active=controller.units[n].active)
                            for n, v in utilities.items()], budget=20)
        controller.apply(desired)
        if controller.units["good"].active:
            break
    assert controller.units["good"].active and round_ == 3
    assert not controller.units["bad"].active


def test_the_controller_never_flips_a_unit_inside_its_guard():
    rng = random.Random(2)
    controller = Controller([f"u{i}" for i in range(8)], votes=1, guard=3)
    last_flip: dict[str, int] = {}
    for round_ in range(300):
        flips = controller.apply({n for n in controller.units if rng.random() < 0.5})
        for name in flips:
            if name in last_flip:
                assert round_ - last_flip[name] > 3, f"{name} flipped inside its guard"
            last_flip[name] = round_
    assert len(last_flip) == 8  # every unit did flip at some point: the test exercised the guard


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4)
        self.conv2 = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


def test_never_trained_units_get_a_first_order_estimate_not_zero():
    from types import SimpleNamespace

    torch.manual_seed(0)
    net = Tiny()
    pool = build_pool(net, lora_ranks=(1, 2))
    freeze_base(net)
    hook = SeaPeftHook(net, pool, SeaPeftConfig(budget=100, lr=1e-3, allocate_every=20))
    image = torch.randn(2, 1, 8, 8, 8)
    label = (image > 0.3).long()
    hook.buffer = (image, label)
    context = SimpleNamespace(device="cpu")
    names = [u.name for u in pool]
    estimates = hook._gradient_estimates(context, names)
    assert all(value > 0 for value in estimates.values()), "every identity-initialised unit has a gradient"
    assert not any(record.active for record in hook.gates.values()), "estimation leaves every gate off"
    # by hand for one unit: η · k · ‖∂ softDice / ∂θ‖₁ with only that unit on
    name = next(n for n in names if n.endswith("lora_r1") and n.startswith("conv1"))
    hook._set(name, True)
    dice = 1 - hook.dice(net(image), label)
    grads = torch.autograd.grad(dice, list(hook.gates[name].unit.parameters()))
    hook._set(name, False)
    assert estimates[name] == pytest.approx(1e-3 * 20 * sum(float(g.abs().sum()) for g in grads), rel=1e-4)


def test_real_allocation_run_keeps_the_budget_and_reports_units(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_worker import events, spec

    from PEFTAdaptLib.jobs import MethodSpec, write_job
    from PEFTAdaptLib.worker import EXIT_FINISHED, run_job

    job = spec(steps=10, checkpoint_every=10)
    job.method = MethodSpec("sea-peft", budget=0.01)
    job.train.audit_every = 5
    write_job(tmp_path, job)
    assert run_job(tmp_path, echo=False) == EXIT_FINISHED
    seen = events(tmp_path)
    budget = next(e for e in seen if e["event"] == "started")["budget"]
    assert budget == int(0.01 * 2_126_258)
    allocations = [e for e in seen if e["event"] == "allocation"]
    assert [a["step"] for a in allocations] == [0, 10]
    assert all(0 < a["budget_used"] <= budget for a in allocations)
    audits = [e for e in seen if e["event"] == "unit_audit"]
    assert {"gradient", "measured"} <= {a["estimate"] for a in audits}
    for field in ("unit", "site", "family", "rank", "cost", "delta_dice", "utility", "state"):
        assert all(field in a for a in audits)
    dice = [e["dice"] for e in seen if e["event"] == "audit"]
    assert max(dice[1:]) >= dice[0]
