"""Masked training: exact zeros, seeded determinism, rewind continuation, schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lth_search.config import TrainConfig, load_config
from lth_search.engine.data import load_dataset
from lth_search.engine.models import build_model
from lth_search.engine.pruning import ones_mask, prune_round, random_mask_like
from lth_search.engine.train import Schedule, evaluate, train


@pytest.fixture(scope="module")
def setup(data_root: Path):
    cfg = load_config(None, [f"data.root={data_root}", "model.widths=[64, 64]", "train.steps=150"])
    data = load_dataset(cfg.data, cfg.seed)
    return cfg, data


def _model(cfg, data, seed=0):
    return build_model(cfg.model, data.input_shape, data.num_classes, seed)


def _sparse_mask(model, rate=0.8, seed=3):
    return random_mask_like(prune_round({n: p.detach() for n, p in model.named_parameters()},
                                        ones_mask(model), model.prunable, rate), seed)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_masked_weights_are_exactly_zero_after_every_step(setup, optimizer: str) -> None:
    cfg, data = setup
    recipe = cfg.train.model_copy(update={"optimizer": optimizer, "momentum": 0.9 if optimizer == "sgd" else 0.0,
                                          "nesterov": optimizer == "sgd", "weight_decay": 1e-3, "lr": 0.05})
    model = _model(cfg, data)
    mask = _sparse_mask(model)
    params = dict(model.named_parameters())
    seen = []

    def check(*_):  # runs before every forward pass, i.e. after every optimizer step
        seen.append(all(bool((params[n][~m] == 0).all()) for n, m in mask.items()))

    model.register_forward_pre_hook(check)
    train(model, data, recipe, seed=0, mask=mask)
    assert len(seen) == 150 and all(seen)
    assert all(bool((params[n][~m] == 0).all()) for n, m in mask.items())
    assert all(bool((params[n][m] != 0).all()) for n, m in mask.items())  # survivors did train


def test_training_is_deterministic_for_a_seed(setup) -> None:
    cfg, data = setup
    runs = []
    for _ in range(2):
        model = _model(cfg, data)
        runs.append(train(model, data, cfg.train, seed=5).state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = train(_model(cfg, data), data, cfg.train, seed=6).state
    assert not all(torch.equal(runs[0][k], other[k]) for k in other)


def test_resuming_at_step_k_sees_the_same_batches_and_lrs(setup) -> None:
    """Plain SGD has no optimizer state, so k -> T from theta_k must equal 0 -> T exactly."""
    cfg, data = setup
    recipe = TrainConfig(optimizer="sgd", lr=0.1, steps=120, schedule="step", milestones=[60], warmup_steps=10)
    model = _model(cfg, data)
    full = train(model, data, recipe, seed=1, snapshot_steps=[0, 40, 120])
    model.load_state_dict(full.snapshots[40])
    tail = train(model, data, recipe, seed=1, start_step=40)
    assert tail.steps == 80
    for name, value in full.state.items():
        assert torch.allclose(value, tail.state[name], atol=1e-6), name
    assert all(torch.equal(full.snapshots[120][k], full.state[k]) for k in full.state)


def test_schedules() -> None:
    step = Schedule(100, 1.0, "step", (50, 80), 0.1, 0)
    assert [round(step.lr_at(s), 6) for s in (0, 49, 50, 79, 80, 99)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    warm = Schedule(100, 1.0, "constant", (), 0.1, 10)
    assert warm.lr_at(0) == pytest.approx(0.1) and warm.lr_at(9) == 1.0 and warm.lr_at(50) == 1.0
    cosine = Schedule(100, 1.0, "cosine", (), 0.1, 0)
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(50) == pytest.approx(0.5) and cosine.lr_at(100) == pytest.approx(0)


def test_evaluate_matches_a_manual_count(setup) -> None:
    cfg, data = setup
    model = _model(cfg, data)
    with torch.no_grad():
        expected = (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
    assert evaluate(model, data.val, batch_size=64) == pytest.approx(expected)
    assert model.training


def test_reports_loss_and_throughput(setup) -> None:
    cfg, data = setup
    result = train(_model(cfg, data), data, cfg.train, seed=0)
    assert result.steps == 150 and result.steps_per_s > 0 and 0 < result.train_loss < 5


def test_crop_flip_is_seeded_and_geometric() -> None:
    from lth_search.engine.augment import augment

    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    first = augment(images, "crop_flip", seed=1, step=5)
    assert first.shape == images.shape and torch.equal(first, augment(images, "crop_flip", seed=1, step=5))
    assert not torch.equal(first, augment(images, "crop_flip", seed=1, step=6))
    assert augment(images, "none", seed=1, step=5) is images
    for i in range(2):  # every output is a shifted (maybe mirrored) window of the zero-padded input
        padded = torch.nn.functional.pad(images[i], (4, 4, 4, 4))
        windows = [padded[:, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(first[i], w) for w in windows)
    with pytest.raises(ValueError, match="train.augment"):
        augment(torch.zeros(4, 40), "crop_flip", 0, 0)
