"""Structured rounds (issue 23): channel, block:N and n:m masks, their config, and the channel ticket's
smaller dense export computing what the ticket computes."""

from __future__ import annotations

import pytest
import torch

from lth_search.config import load_config
from lth_search.engine.models import build_model
from lth_search.engine.pruning import ones_mask
from lth_search.engine.structured_pruning import channel_chain, structured_round
from lth_search.errors import ConfigError
from lth_search.portable.structured import shrink


def _model(name: str, shape: tuple[int, ...]):
    cfg = load_config(None, [f"model.name={name}"])
    model = build_model(cfg.model, shape, 10, 0)
    return model, dict(model.prunable), dict(model.state_dict())


@pytest.mark.parametrize("name,shape", [("lenet_300_100", (1, 8, 8)), ("conv4", (3, 8, 8))])
def test_channel_rounds_remove_units_with_their_readers_and_export_smaller(name: str, shape: tuple[int, ...]) -> None:
    model, groups, weights = _model(name, shape)
    chain = channel_chain(model, name)
    mask = ones_mask(model)
    for _ in range(2):
        mask = structured_round(weights, mask, groups, 0.3, "layerwise", "channel", chain=chain)
    names, spreads = chain
    for index, layer in enumerate(names[:-1]):
        units = mask[layer].shape[0]
        rows_gone = ~mask[layer].reshape(units, -1).any(dim=1)
        first = int(0.3 * units + 0.5)
        assert int(rows_gone.sum()) == first + int(0.3 * (units - first) + 0.5), layer  # layerwise counts, in units
        consumer = mask[names[index + 1]]
        if consumer.dim() == 2:  # Linear: the `spread` inputs each unit feeds
            reads = consumer.reshape(consumer.shape[0], units, spreads[index]).any(dim=2).any(dim=0)
        else:  # Conv2d: the input channel
            reads = consumer.transpose(0, 1).reshape(units, -1).any(dim=1)
        assert not reads[rows_gone].any() and reads[~rows_gone].all(), layer  # nobody reads a pruned unit
    assert mask[names[-1]].reshape(10, -1).any(dim=1).all()  # every class keeps its output unit
    state = {k: (v * mask[k] if k in mask else v) for k, v in weights.items()}
    model.load_state_dict(state)
    spec = {"architecture": name, "input_shape": list(shape), "num_classes": 10, "options": {}}
    small, small_spec, _ = shrink(model.eval(), spec)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.5 * before


def test_block_and_n_of_m_patterns() -> None:
    model, groups, weights = _model("lenet_300_100", (1, 8, 8))
    mask = structured_round(weights, ones_mask(model), groups, 0.5, "global", "block:4")
    for layer, kept in mask.items():
        matrix = kept.reshape(kept.shape[0], -1)
        rows, cols = matrix.shape
        padded = torch.ones(-(-rows // 4) * 4, -(-cols // 4) * 4, dtype=torch.bool)
        padded[:rows, :cols] = matrix
        blocks = padded.reshape(padded.shape[0] // 4, 4, padded.shape[1] // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
        partial = blocks.any(dim=1) & ~blocks.all(dim=1)
        assert not partial[:-1].any() or rows % 4 or cols % 4, layer  # whole blocks go
    total = sum(m.numel() for m in mask.values())
    assert 0.4 < 1 - sum(int(m.sum()) for m in mask.values()) / total < 0.6
    mask = structured_round(weights, ones_mask(model), groups, 0.2, "global", "2:4")
    for kept in mask.values():
        groups_of_4 = kept.reshape(kept.shape[0], -1)[:, : kept[0].numel() // 4 * 4].reshape(-1, 4)
        assert int(groups_of_4.sum(dim=1).max()) <= 2


def test_structure_config_search_dimension_and_model_check() -> None:
    cfg = load_config(None, ["prune.structure=2:4", "search.space.structure=[unstructured, channel, block:8]"])
    assert cfg.prune.structure == "2:4" and cfg.prune.choices()["structure"] == "2:4"
    assert "structure" not in load_config(None, []).prune.choices()  # unstructured keys keep their shape
    assert cfg.searched_values()["structure"] == ["unstructured", "channel", "block:8"]
    with pytest.raises(ConfigError, match=r"prune.structure: must be unstructured, channel, block:N .* got '4:2'"):
        load_config(None, ["prune.structure=4:2"])
    model, _, _ = _model("resnet20", (3, 8, 8))
    with pytest.raises(ConfigError, match="channel needs a chain model .* not 'resnet20'"):
        channel_chain(model, "resnet20")


def test_compare_tables_structured_against_unstructured_at_equal_counts(data_root, tmp_path) -> None:
    from conftest import tiny_config

    from lth_search.compare import run_compare

    cfg = tiny_config(data_root, tmp_path, train__steps=60, prune__rounds=2, prune__rate=0.3)
    result = run_compare(cfg, ["imp"], [0], structures=["unstructured", "channel"])
    assert result.kinds == ["imp", "imp_channel"]
    channel = [r for r in result.rows if r.kind == "imp_channel"]
    assert [r.round for r in channel] == [1, 2] and channel[0].sparsity > 0
    lines = result.table().splitlines()
    assert "at equal parameter counts" in "\n".join(lines)
    assert sum(line.startswith("imp_channel") for line in lines) == 4  # its rounds, then beside unstructured
