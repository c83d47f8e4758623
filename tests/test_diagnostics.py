"""Diagnostics on hand-computed cases: sign preservation, trajectory alignment, LMC barrier, layer health."""

from __future__ import annotations

import pytest
import torch

from lth_search.engine.diagnostics import (
    error_barrier,
    health_warnings,
    interpolation_errors,
    interpolation_points,
    layer_health,
    perturbed_start,
    probe_gradients,
    sign_preservation,
    trajectory_alignment,
)
from lth_search.portable.architectures import MLP


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sign_preservation_is_one_when_no_kept_weight_flips() -> None:
    reference = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}
    end = {"w": torch.tensor([0.5, -7.0, 0.1, 9.0])}  # only the pruned last weight flips
    mask = {"w": torch.tensor([True, True, True, False])}
    rho = sign_preservation(reference, end, mask, end)
    assert rho.ticket == 1.0
    assert rho.dense == pytest.approx(3 / 4)


def test_sign_preservation_known_fraction() -> None:
    reference = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0, 5.0]), "v": torch.tensor([[1.0, 1.0]])}
    end = {"w": torch.tensor([2.0, -1.0, -3.0, 4.0, 0.0]), "v": torch.tensor([[-1.0, 1.0]])}
    mask = {"w": torch.tensor([True, True, True, True, False]), "v": torch.tensor([[True, False]])}
    rho = sign_preservation(reference, end, mask, end)
    # ticket: kept and non-zero at reference: w0 w1 w2 v0 -> w0, w1 keep their sign: 2/4
    assert rho.ticket == pytest.approx(2 / 4)
    # dense: every non-zero reference weight: w0 w1 w2 w4 v0 v1 -> w0 w1 v1 (w4 ended at 0): 3/6
    assert rho.dense == pytest.approx(3 / 6)


def test_trajectory_alignment_hand_computed() -> None:
    gradient = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, 0.0]])}
    assert trajectory_alignment(gradient, {"a": torch.tensor([True, True]), "b": torch.tensor([[True, True]])}) == 1.0
    assert trajectory_alignment(gradient, {"a": torch.tensor([True, False]), "b": torch.tensor([[False, True]])}) == \
        pytest.approx(9 / 25)
    assert trajectory_alignment(gradient, {"a": torch.tensor([False, True]), "b": torch.tensor([[True, True]])}) == \
        pytest.approx(16 / 25)


def test_trajectory_alignment_of_a_real_gradient() -> None:
    model = MLP(4, [5], 3)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0] * 4)
    names = ["hidden.0.weight", "output.weight"]
    grads = probe_gradients(model, model.state_dict(), x, y, names)
    ones = {n: torch.ones_like(grads[n], dtype=torch.bool) for n in names}
    assert trajectory_alignment(grads, ones) == pytest.approx(1.0)
    half = {"hidden.0.weight": ones["hidden.0.weight"], "output.weight": torch.zeros_like(ones["output.weight"])}
    expected = float(grads["hidden.0.weight"].pow(2).sum()) / sum(float(g.pow(2).sum()) for g in grads.values())
    assert trajectory_alignment(grads, half) == pytest.approx(expected)
    assert 0 < expected < 1


def _two_unit_net(swapped: bool) -> dict[str, torch.Tensor]:
    """x -> (relu(x), relu(-x)) -> logits = the two units; `swapped` permutes the hidden units.

    Both compute the same function (x=+1 -> class 0, x=-1 -> class 1, no error); the
    midpoint of the straight line between them has all-zero first-layer weights and
    equal logits, so it answers class 0 for both inputs: error 1/2 there.
    """
    first = torch.tensor([[1.0], [-1.0]])
    second = torch.eye(2)
    if swapped:
        first, second = first.flip(0), second.flip(1)
    return {"hidden.0.weight": first, "hidden.0.bias": torch.zeros(2),
            "output.weight": second, "output.bias": torch.zeros(2)}


def test_barrier_is_zero_for_identical_end_points() -> None:
    model = MLP(1, [2], 2)
    x, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1])
    a = _two_unit_net(False)
    points = interpolation_points(5)
    errors = interpolation_errors(model, a, a, x, y, points)
    assert errors == [0.0] * 5 and error_barrier(points, errors) == 0.0


def test_barrier_of_a_known_bump() -> None:
    model = MLP(1, [2], 2)
    x, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1])
    points = interpolation_points(5)
    errors = interpolation_errors(model, _two_unit_net(False), _two_unit_net(True), x, y, points)
    assert errors == [0.0, 0.0, 0.5, 0.0, 0.0]
    assert error_barrier(points, errors) == pytest.approx(0.5)
    assert error_barrier([0, 0.5, 1], [0.2, 0.3, 0.4]) == pytest.approx(0.1)  # max minus mean of the ends
    with pytest.raises(ValueError):
        error_barrier([0.5, 1], [0.1, 0.2])


def test_perturbation_keeps_pruned_weights_zero() -> None:
    state = {"w": torch.arange(1.0, 9.0).reshape(2, 4), "b": torch.ones(2)}
    mask = {"w": torch.tensor([[True, False, True, True], [False, True, True, False]])}
    same = perturbed_start(state, mask, 0.0, seed=1)
    assert torch.equal(same["w"], state["w"] * mask["w"]) and torch.equal(same["b"], state["b"])
    noisy = perturbed_start(state, mask, 0.1, seed=1)
    assert bool((noisy["w"][~mask["w"]] == 0).all()) and not torch.equal(noisy["w"], same["w"])
    assert torch.equal(noisy["w"], perturbed_start(state, mask, 0.1, seed=1)["w"])


def test_layer_health_flags_collapse_and_deviation() -> None:
    mask = {
        "a": torch.zeros(100, dtype=torch.bool),
        "b": torch.ones(1000, dtype=torch.bool),
        "c": torch.tensor([True] * 1 + [False] * 999),
    }
    mask["b"][:900] = False  # b keeps 100 of 1000
    rows = {row.name: row for row in layer_health(mask, target=0.9)}
    assert rows["a"].collapsed and rows["a"].kept == 0
    assert not rows["b"].collapsed and not rows["b"].deviates and rows["b"].sparsity == pytest.approx(0.9)
    assert rows["c"].collapsed  # 0.1 % kept vs 4.8 % overall
    lines = health_warnings(list(rows.values()))
    assert len(lines) == 2 and lines[0].startswith("layer a collapsed")
    assert layer_health({"b": mask["b"]}, target=0.5)[0].deviates
