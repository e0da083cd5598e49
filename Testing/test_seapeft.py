"""SEA-PEFT pure logic: utility smoothing, calibration, knapsack, controller, sampler, allocator (no torch needed
beyond imports; each test runs in milliseconds)."""
from __future__ import annotations

import itertools
import random

import pytest

from PEFTAdaptLib.seapeft import Allocator, PoolUnit, SeaPeftConfig
from PEFTAdaptLib.seapeft.controller import ACTIVE_GUARD, INACTIVE_GUARD, Controller
from PEFTAdaptLib.seapeft.estimate import Calibration, FamilyCalibration, first_order_gain
from PEFTAdaptLib.seapeft.knapsack import PER, Candidate, allocate, greedy
from PEFTAdaptLib.seapeft.sampler import AuditSampler
from PEFTAdaptLib.seapeft.utility import RobustUtility


# -- utility ---------------------------------------------------------------------------------------------------------
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
    # two values: inclusive quartiles interpolate, Q1 = a + (b − a)/4, Q3 = a + 3(b − a)/4
    two = RobustUtility(beta=0.0, window=5, iqr_weight=0.5)
    two.update(2.0)
    assert two.score == 2.0 and two.uncertainty == 0.0
    two.update(6.0)
    assert two.score == pytest.approx(4.0 - 0.5 * 2.0)
    two.reset()
    assert two.score == 0.0 and two.observations == 0 and two.ema is None


def test_calibration_is_the_clipped_median_ratio():
    calibration = Calibration(window=3, bounds=(0.1, 1.0))
    assert calibration.factor == 1.0  # no evidence yet: the raw first-order estimate
    for predicted, measured in [(1.0, 0.2), (2.0, 0.2), (0.5, 0.4), (1.0, 0.5)]:  # the first pair leaves
        calibration.add(predicted, measured)
    assert calibration.factor == pytest.approx(0.5)  # median of 0.1, 0.8, 0.5
    calibration.add(1.0, -3.0)
    calibration.add(1.0, -1.0)
    assert calibration.factor == 0.1  # median −1 clipped to the lower bound
    assert first_order_gain(gradient_l1=4.0, lr=1e-3, horizon=10) == pytest.approx(0.04)


def test_each_family_has_its_own_calibration_and_an_unmeasured_one_borrows_the_pooled_pairs():
    calibration = FamilyCalibration(window=4, bounds=(0.01, 20.0))
    assert calibration.factor("lora") == 1.0
    for predicted, measured in [(0.01, 0.09), (0.02, 0.2)]:  # LoRA realises ~9× its first-order estimate
        calibration.add("lora", predicted, measured)
    for predicted, measured in [(1.0, 0.2), (2.0, 0.4), (1.0, 0.1)]:  # a dense delta ~0.2×
        calibration.add("dense", predicted, measured)
    assert calibration.factor("lora") == pytest.approx(9.5)
    assert calibration.factor("dense") == pytest.approx(0.2)
    # the pooled window keeps the last 4 pairs of any family: 10, 0.2, 0.2, 0.1 → median 0.2
    assert calibration.factor("salt") == pytest.approx(0.2)
    assert calibration.factors() == {"*": pytest.approx(0.2), "dense": pytest.approx(0.2), "lora": pytest.approx(9.5)}
    again = FamilyCalibration(window=4, bounds=(0.01, 20.0))
    again.load_state_dict(calibration.state_dict())
    assert again.factors() == calibration.factors()


# -- knapsack ----------------------------------------------------------------------------------------------------------
def _random_candidates(rng: random.Random, n: int, locked: bool = True) -> list[Candidate]:
    out = []
    for i in range(n):
        active = rng.random() < 0.3
        out.append(Candidate(f"u{i}", (f"s{rng.randint(0, 5)}", rng.choice(["lora", "salt"])), rng.randint(1, 40),
                             rng.uniform(-1, 2), active=active, locked=locked and rng.random() < 0.2))
    return out


def test_knapsack_respects_the_budget_and_one_variant_per_site_and_family():
    rng = random.Random(0)
    for _ in range(300):
        candidates = _random_candidates(rng, 30)
        by_name = {c.name: c for c in candidates}
        # a feasible start: the locked active units themselves respect the rule and fit
        kept, keys, used = [], set(), 0
        for c in candidates:
            if c.locked and c.active and c.key not in keys:
                kept.append(c.name)
                keys.add(c.key)
                used += c.cost
        candidates = [c if not (c.locked and c.active and c.name not in kept) else
                      Candidate(c.name, c.key, c.cost, c.value, True, False) for c in candidates]
        budget = max(used, rng.randint(10, 200))
        chosen = allocate(candidates, budget, hysteresis=0.01)
        assert sum(by_name[n].cost for n in chosen) <= budget
        keys = [by_name[n].key for n in chosen]
        assert len(keys) == len(set(keys)), "two variants of one (site, family)"
        assert set(kept) <= chosen, "a guarded active unit was dropped"
        assert not any(c.locked and not c.active and c.name in chosen for c in candidates), "a guarded unit entered"
        assert all(by_name[n].gain > 0 or by_name[n].active for n in chosen)


def _total(candidates, names, hysteresis=0.0):
    return sum(c.gain + (hysteresis if c.active else 0) for c in candidates if c.name in names)


def test_synthetic_pool_with_known_utilities_is_allocated_optimally():
    rng = random.Random(1)
    for trial in range(60):
        # unequal costs, where greedy by density is not optimal in general; brute force is the truth
        candidates = [Candidate(f"u{i}", (f"s{i % 4}", f"f{i % 2}"), rng.randint(5, 60), rng.uniform(-0.5, 1.0))
                      for i in range(11)]
        budget = rng.randint(20, 160)
        chosen = allocate(candidates, budget)
        feasible = (
            set(s) for k in range(len(candidates) + 1) for s in itertools.combinations([c.name for c in candidates], k)
            if sum(c.cost for c in candidates if c.name in s) <= budget
            and len({c.key for c in candidates if c.name in s}) == k
        )
        best = max(feasible, key=lambda s: _total(candidates, s))
        assert _total(candidates, chosen) == pytest.approx(_total(candidates, best)), f"trial {trial}"
        greedy_total = _total(candidates, {c.name for c in greedy(candidates, budget)})
        assert _total(candidates, chosen) >= greedy_total - 1e-12


def test_the_knapsack_beats_greedy_where_greedy_is_not_optimal():
    # greedy takes the dense small unit and then has no room for the big one
    small = Candidate("small", ("a", "lora"), 10, value=PER * 0.2 / 10)  # gain 0.2, density 0.02
    big = Candidate("big", ("b", "lora"), 100, value=PER * 1.0 / 100)  # gain 1.0, density 0.01
    assert {c.name for c in greedy([small, big], 100)} == {"small"}
    assert allocate([small, big], 100) == {"big"}


def test_hysteresis_keeps_an_incumbent_against_a_marginally_better_variant():
    incumbent = Candidate("r1", ("conv1", "lora"), 100, value=10.0, active=True)  # gain 1.0
    slightly = Candidate("r2", ("conv1", "lora"), 100, value=10.1)  # gain 1.01
    clearly = Candidate("r4", ("conv1", "lora"), 100, value=12.0)  # gain 1.2
    assert allocate([incumbent, slightly], 100, hysteresis=0.05) == {"r1"}
    assert allocate([incumbent, slightly], 100, hysteresis=0.0) == {"r2"}
    assert allocate([incumbent, clearly], 100, hysteresis=0.05) == {"r4"}
    harmful = Candidate("bad", ("conv2", "salt"), 10, value=-2.0, active=True)  # gain −0.02 < −hysteresis
    tolerable = Candidate("meh", ("conv3", "salt"), 10, value=-2.0, active=True)
    assert allocate([harmful], 100, hysteresis=0.01) == set()
    assert allocate([tolerable], 100, hysteresis=0.05) == {"meh"}


# -- controller --------------------------------------------------------------------------------------------------------
def test_the_controller_never_flips_a_unit_inside_its_guard_and_never_exceeds_the_budget():
    rng = random.Random(2)
    names = [f"u{i}" for i in range(10)]
    costs = {n: rng.randint(1, 10) for n in names}
    keys = {n: (f"s{i % 4}", "lora") for i, n in enumerate(names)}
    for guard, votes in [(1, 1), (2, 1), (3, 2), (2, 3)]:
        controller = Controller(names, votes=votes, guard=guard)
        last_flip: dict[str, int] = {}
        for round_ in range(400):
            labels_before = {n: s.label for n, s in controller.units.items()}
            flips = controller.apply({n for n in names if rng.random() < 0.5}, costs, 20, keys=keys)
            for name in flips:
                assert labels_before[name] not in (ACTIVE_GUARD, INACTIVE_GUARD), "flipped from a guard state"
                if name in last_flip:
                    assert round_ - last_flip[name] > guard, f"{name} flipped inside its guard"
                assert controller.units[name].label in (ACTIVE_GUARD, INACTIVE_GUARD)
                last_flip[name] = round_
            active = controller.active()
            assert sum(costs[n] for n in active) <= 20
            assert len({keys[n] for n in active}) == len(active)
        assert len(last_flip) == len(names), "every unit flipped at some point: the guard was exercised"


def test_votes_delay_a_flip_and_an_interrupted_streak_starts_over():
    controller = Controller(["a"], votes=3, guard=1)
    costs = {"a": 1}
    assert controller.apply({"a"}, costs, 10) == {} and controller.units["a"].label == "promoting"
    assert controller.apply(set(), costs, 10) == {} and controller.units["a"].label == "inactive"
    assert controller.apply({"a"}, costs, 10) == {}
    assert controller.apply({"a"}, costs, 10) == {}
    assert controller.apply({"a"}, costs, 10) == {"a": True}


def test_a_promotion_that_does_not_fit_waits_instead_of_breaking_the_budget():
    controller = Controller(["big", "small"], votes=1, guard=1)
    costs = {"big": 8, "small": 5}
    controller.start(["big"], guard=2)
    assert controller.apply({"small"}, costs, 10) == {}  # big is guarded: small must wait for the room
    assert controller.units["small"].label == "promoting"
    assert controller.apply({"small"}, costs, 10) == {}  # big's last guarded round
    assert controller.apply({"small"}, costs, 10) == {"big": False, "small": True}  # demotion first, then room
    assert controller.active() == {"small"}


# -- sampler ---------------------------------------------------------------------------------------------------------
def test_sampler_forces_overdue_units_and_gives_most_slots_to_active_units():
    sampler = AuditSampler(k=4, active_share=0.75, debt_horizon=3, uniform_audits=1, seed=0)
    measurable = [f"a{i}" for i in range(6)] + [f"i{i}" for i in range(6)]
    active = {n for n in measurable if n.startswith("a")}
    probes, last = dict.fromkeys(measurable, 0), dict.fromkeys(measurable, 0)
    for audit in range(1, 30):
        chosen = sampler.sample(measurable, active, probes, last, {})
        assert len(chosen) == len(set(chosen)) == 4
        for name in chosen:
            probes[name] += 1
            last[name] = audit
        if audit > 3:  # nobody stays unprobed for longer than the horizon plus the slots it takes to catch up
            assert all(audit - last[n] <= 3 + len(measurable) // 4 for n in measurable)
    assert sum(probes[n] for n in active) > sum(probes[n] for n in measurable if n not in active)
    again = AuditSampler(k=4, active_share=0.75, debt_horizon=3, uniform_audits=1, seed=0)
    assert again.sample(measurable, active, {}, {}, {}) == \
        AuditSampler(k=4, active_share=0.75, debt_horizon=3, uniform_audits=1, seed=0).sample(measurable, active, {}, {}, {})


# -- allocator -------------------------------------------------------------------------------------------------------
def _pool(spec: dict[str, tuple[str, str, int]]) -> list[PoolUnit]:
    return [PoolUnit(name, site, "conv", family, family, name, 1, cost) for name, (site, family, cost) in spec.items()]


def test_allocator_selects_the_optimal_set_from_exact_measurements():
    rng = random.Random(3)
    for _ in range(20):
        spec = {f"u{i}": (f"s{i % 3}", f"f{i % 2}", rng.randint(5, 50)) for i in range(9)}
        true_gain = {n: rng.uniform(-0.02, 0.05) for n in spec}
        budget = rng.randint(30, 120)
        allocator = Allocator(_pool(spec), SeaPeftConfig(budget=budget, exploration=0.0, hysteresis=0.0))
        allocator.trained = set(spec)
        for name, gain in true_gain.items():
            allocator.observe_toggle(name, gain)
        chosen = allocator.desired()
        feasible = (set(s) for k in range(len(spec) + 1) for s in itertools.combinations(spec, k)
                    if sum(spec[n][2] for n in s) <= budget and len({spec[n][0] for n in s}) == k)  # one per layer
        best = max(feasible, key=lambda s: sum(true_gain[n] for n in s))
        assert sum(true_gain[n] for n in chosen) == pytest.approx(sum(true_gain[n] for n in best))


def test_a_unit_with_positive_true_utility_enters_within_a_bounded_number_of_rounds():
    """A decoy looks best by its first-order estimate and fills the budget; once audits show it is harmful, the
    good unit (which never trained: it lives on first-order estimates) must replace it within
    guard + votes + ⌈debt_horizon / audits per round⌉ + 1 rounds."""
    spec = {"decoy": ("s0", "lora", 100), "good": ("s1", "lora", 100), "filler": ("s2", "norm", 10)}
    true = {"decoy": -0.01, "good": 0.03, "filler": 0.001}
    first_order = {"decoy": 0.2, "good": 0.05, "filler": 0.002}
    for votes, guard in [(1, 1), (2, 2), (3, 1)]:
        config = SeaPeftConfig(budget=110, votes=votes, guard=guard, debt_horizon=2, audit_units=1, uniform_audits=0)
        allocator = Allocator(_pool(spec), config)
        rng = random.Random(votes * 10 + guard)
        for name in allocator.fresh():
            allocator.observe_estimate(name, first_order[name], base_dice=0.5)
        allocator.start()
        assert "decoy" in allocator.active() and "good" not in allocator.active()
        audits_per_round = 2
        bound = guard + votes + -(-config.debt_horizon // audits_per_round) + 1
        for round_ in range(1, 30):
            allocator.mark_trained()
            for _ in range(audits_per_round):
                for name in allocator.plan_audit():
                    allocator.observe_toggle(name, true[name] + rng.gauss(0, 0.002))
            for name in allocator.fresh():
                allocator.observe_estimate(name, first_order[name], base_dice=0.5)
            allocator.allocate()
            if "good" in allocator.active():
                break
        assert "good" in allocator.active() and "decoy" not in allocator.active()
        assert round_ <= bound, f"votes {votes}, guard {guard}: entered after {round_} rounds (bound {bound})"
        assert allocator.calibration.pooled.pairs, "the decoy's estimate was checked against its measurement"
        assert allocator.calibration.factor("lora") < 1.0


def test_the_first_allocation_takes_the_prior_then_fills_the_budget_one_unit_per_layer():
    spec = {"in::dense": ("in", "dense", 40), "in::lora": ("in", "lora", 8), "out::dense": ("out", "dense", 20),
            "norm::affine": ("norm", "norm_affine", 4), "mid::lora": ("mid", "lora", 30),
            "mid::salt": ("mid", "salt", 6)}
    estimate = {"in::dense": 0.01, "in::lora": 0.3, "out::dense": 0.002, "norm::affine": 0.001, "mid::lora": 0.2,
                "mid::salt": 0.1}
    prior = ["in::dense", "out::dense", "norm::affine"]
    for budget, expected in [(100, {"in::dense", "out::dense", "norm::affine", "mid::lora"}),
                             (70, {"in::dense", "out::dense", "norm::affine", "mid::salt"}),
                             (30, {"out::dense", "norm::affine", "mid::salt"})]:
        allocator = Allocator(_pool(spec), SeaPeftConfig(budget=budget))
        for name, gain in estimate.items():
            allocator.observe_estimate(name, gain, base_dice=0.5)
        allocator.start(prior)
        # the prior's units are taken although LoRA on the input layer looks better by its estimate (and then
        # cannot join the dense delta there); the rest of the budget goes to the best units of other layers; where
        # the prior does not fit, the knapsack picks within it
        assert allocator.active() == expected, budget
        assert allocator.budget_used() <= budget
        assert len({allocator.units[n].site for n in allocator.active()}) == len(allocator.active())
    without = Allocator(_pool(spec), SeaPeftConfig(budget=100))
    for name, gain in estimate.items():
        without.observe_estimate(name, gain, base_dice=0.5)
    without.start()
    assert "in::lora" in without.active() and "in::dense" not in without.active()


def test_first_order_estimates_and_toggles_never_mix_and_state_round_trips():
    allocator = Allocator(_pool({"a": ("s0", "lora", 10), "b": ("s1", "lora", 20)}), SeaPeftConfig(budget=25))
    allocator.observe_estimate("a", 0.5, base_dice=0.9)  # capped at the Dice gap 1 − 0.9
    assert allocator.utilities["a"].score == pytest.approx(PER * 0.1 / 10)
    allocator.start()
    allocator.mark_trained()
    with pytest.raises(ValueError):
        allocator.observe_estimate("a", 0.1, base_dice=0.5)
    allocator.observe_toggle("a", 0.02)
    assert allocator.source["a"] == "toggle" and allocator.utilities["a"].observations == 1
    assert allocator.utilities["a"].score == pytest.approx(PER * 0.02 / 10)
    state = allocator.state_dict()
    other = Allocator(allocator.pool, SeaPeftConfig(budget=25))
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.active() == allocator.active()
