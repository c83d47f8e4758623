"""Pruning at initialisation: SynFlow by hand, SNIP and GraSP against direct autograd, no empty layers."""

from __future__ import annotations

import pytest
import torch

from lth_search.portable.architectures import MLP
from lth_search.engine.pruning import prune_lowest_scores
from lth_search.engine.prune_at_init import grasp_scores, prune_at_init, snip_scores, synflow_scores

NAMES = ["hidden.0.weight", "output.weight"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small(seed: int = 0) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = MLP(3, [4], 3).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    return model, x, y


def test_synflow_scores_match_a_hand_computed_network() -> None:
    model = MLP(2, [2], 1)
    state = {"hidden.0.weight": torch.tensor([[1.0, -2.0], [3.0, 0.5]]), "hidden.0.bias": torch.tensor([0.5, -1.0]),
             "output.weight": torch.tensor([[2.0, -1.0]]), "output.bias": torch.tensor([-7.0])}
    scores = synflow_scores(model, state, (2,), NAMES)
    # |W1| 1 + |b1| = h = (3.5, 4.5); R = |W2| h + |b2|.
    # dR/dW2_j = h_j -> |W2_j| h_j = (7, 4.5); dR/dW1_ji = |W2_j| -> |W2_j| |W1_ji|.
    assert scores["output.weight"].tolist() == [[7.0, 4.5]]
    assert scores["hidden.0.weight"].tolist() == [[2.0, 4.0], [3.0, 0.5]]


def test_snip_scores_match_the_connection_sensitivity() -> None:
    model, x, y = _small()
    state = model.state_dict()
    scores = snip_scores(model, state, x, y, NAMES)
    # SNIP's definition: |dL/dc| at c = 1 for weights theta * c.
    c = {n: torch.ones_like(state[n], requires_grad=True) for n in NAMES}
    weights = {n: state[n] * c[n] for n in NAMES}
    hidden = torch.relu(x @ weights["hidden.0.weight"].T + state["hidden.0.bias"])
    loss = torch.nn.functional.cross_entropy(hidden @ weights["output.weight"].T + state["output.bias"], y)
    direct = torch.autograd.grad(loss, [c[n] for n in NAMES])
    for name, expected in zip(NAMES, direct):
        torch.testing.assert_close(scores[name], expected.abs())


def test_grasp_scores_match_theta_times_hessian_gradient() -> None:
    model, x, y = _small(1)
    state = model.state_dict()
    temperature = 3.0
    scores = grasp_scores(model, state, x, y, NAMES, temperature=temperature)
    shapes = [state[n].shape for n in NAMES]
    sizes = [state[n].numel() for n in NAMES]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        w1, w2 = (part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes))
        hidden = torch.relu(x @ w1.T + state["hidden.0.bias"])
        return torch.nn.functional.cross_entropy((hidden @ w2.T + state["output.bias"]) / temperature, y)

    flat = torch.cat([state[n].reshape(-1) for n in NAMES])
    gradient = torch.autograd.functional.jacobian(loss_of, flat)
    hessian = torch.autograd.functional.hessian(loss_of, flat)
    expected = (flat * (hessian @ gradient)).split(sizes)
    for name, value, shape in zip(NAMES, expected, shapes):
        torch.testing.assert_close(scores[name], value.reshape(shape))
    assert any(bool((scores[n] < 0).any()) for n in NAMES)  # signed, unlike SNIP and SynFlow


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_no_layer_is_emptied_unless_asked(method: str) -> None:
    model, x, y = _small(2)
    state = model.state_dict()
    total = sum(state[n].numel() for n in NAMES)  # 12 + 12 = 24 weights
    mask = prune_at_init(method, model, state, NAMES, 0.95, x, y, input_shape=(3,), iterations=10)
    assert all(int(m.sum()) >= 1 for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == max(total - round(0.95 * total), len(NAMES))
    half = prune_at_init(method, model, state, NAMES, 0.5, x, y, input_shape=(3,), iterations=10)
    assert sum(int(m.sum()) for m in half.values()) == 12


def test_allow_empty_lets_the_scores_decide() -> None:
    scores = {"a": torch.tensor([5.0, -1.0, 3.0]), "b": torch.tensor([-2.0, -3.0])}
    mask = {n: torch.ones(v.shape, dtype=torch.bool) for n, v in scores.items()}
    emptied = prune_lowest_scores(scores, mask, 3, protect=False)
    assert emptied["a"].tolist() == [True, False, True] and emptied["b"].tolist() == [False, False]
    kept = prune_lowest_scores(scores, mask, 3)
    assert kept["a"].tolist() == [True, False, False] and kept["b"].tolist() == [True, False]
    assert sum(int(m.sum()) for m in prune_lowest_scores(scores, mask, 99).values()) == 2
