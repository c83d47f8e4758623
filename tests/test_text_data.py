"""Text data from standard files: tokenized offline, padded, integer ids through the data path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from text_helpers import alpaca, sentiment, train_tokenizer, write_jsonl, write_sentiment

from lth_search.config import DataConfig, ModelConfig, load_config
from lth_search.engine.data import load_dataset
from lth_search.engine.models import build_model, check_parts
from lth_search.engine.text_data import IGNORE, load_tokenizer
from lth_search.engine.train import correct, evaluate, train
from lth_search.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [r["text"] for r in sentiment(64, 0)] + [f"{r['instruction']} {r['output']}" for r in alpaca(18)]
    return train_tokenizer(tmp_path_factory.mktemp("tok"), texts + ["Below is an instruction Response Input"])


@pytest.mark.parametrize("fmt", ["datasets", "jsonl", "csv", "parquet"])
def test_every_format_gives_the_same_token_ids(tmp_path, tokenizer, fmt):
    root = write_sentiment(tmp_path / fmt, fmt)
    cfg = DataConfig(name="text", root=str(root), tokenizer=str(tokenizer), max_length=8, val_size=16)
    data = load_dataset(cfg, seed=0)
    assert data.train.x.dtype == torch.int64 and data.train.x.shape == (48, 8)
    assert data.input_shape == (8,) and data.num_classes == 2 and data.task == "classification"
    assert data.vocab_size == load_tokenizer(str(tokenizer)).vocab_size and data.normalization is None
    assert len(data.test) == 32
    first = sentiment(32, 1)[0]["text"].split()
    ids = load_tokenizer(str(tokenizer)).encode([" ".join(first)])[0]
    assert data.test.x[0, : min(len(ids), 8)].tolist() == ids[:8]
    if len(ids) < 8:
        assert (data.test.x[0, len(ids):] == data.pad_id).all()
    reference = load_dataset(DataConfig(name="text", root=str(write_sentiment(tmp_path / "ref", "jsonl")),
                                        tokenizer=str(tokenizer), max_length=8, val_size=16), seed=0)
    assert data.fingerprint == reference.fingerprint  # the content, not the file format


def test_a_raw_tokenizers_file_and_string_labels(tmp_path):
    rows = [{"text": r["text"], "label": ["neg", "pos"][r["label"]]} for r in sentiment(40, 0)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    tok = train_tokenizer(tmp_path / "tok", [r["text"] for r in rows], kind="bpe", transformers_files=False)
    cfg = DataConfig(name="text", root=str(tmp_path / "all.jsonl"), tokenizer=str(tok), max_length=12,
                     val_size=8, test_size=10)
    data = load_dataset(cfg, seed=3)
    assert (len(data.train), len(data.val), len(data.test)) == (22, 8, 10)
    assert data.num_classes == 2 and data.train.x.dtype == torch.int64
    again = load_dataset(cfg.model_copy(update={"root": str(tmp_path / "all.jsonl")}), seed=4)
    assert torch.equal(again.test.x, data.test.x)  # the carved test split never moves with the seed


def test_causal_lm_targets_cover_the_response_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", alpaca(20))
    cfg = DataConfig(name="text_lm", root=str(path), tokenizer=str(tokenizer), max_length=48, val_size=4,
                     test_size=4)
    data = load_dataset(cfg, seed=0)
    tok = load_tokenizer(str(tokenizer))
    assert data.task == "causal_lm" and data.num_classes == tok.vocab_size and data.train.y.shape == (12, 48)
    x, y = data.train.x[0], data.train.y[0]
    targets = (y != IGNORE).nonzero().flatten()
    assert len(targets) > 0
    assert torch.equal(y[targets], x[targets + 1])  # next-token targets
    assert targets[-1] + 1 < 48 and x[targets[-1] + 1] == tok.eos_id  # the response ends with </s>
    assert y[: targets[0]].eq(IGNORE).all()  # the prompt is not a target


def test_token_inputs_train_a_transformer(tmp_path, tokenizer):
    root = write_sentiment(tmp_path / "d", "jsonl", n_train=200, n_test=60)
    cfg = load_config(None, [
        "data.name=text", f"data.root={root}", f"data.tokenizer={tokenizer}", "data.max_length=10", "data.val_size=40",
        "model.name=transformer", "model.d_model=16", "model.heads=2", "model.layers=1", "model.ff_width=16",
        "model.prune_embeddings=true", "train.steps=150", "train.batch_size=32", "train.optimizer=adam",
        "train.lr=0.01", "train.device=cpu", "tracking.enabled=false",
    ])
    with pytest.raises(ConfigError, match="model.vocab_size: 0 is smaller than the tokenizer's vocabulary"):
        check_parts(cfg)
    data = load_dataset(cfg.data, 0)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": data.vocab_size})})
    check_parts(cfg, data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, 0)
    assert model.prunable["embed.weight"] == "embed"
    train(model, data, cfg.train, 0)
    assert evaluate(model, data.test) > 0.9  # the sentiment words decide the label
    assert correct(model, data.val).shape == (40,)


def test_bad_text_inputs_are_one_line_errors(tmp_path, tokenizer):
    root = write_sentiment(tmp_path / "d", "jsonl")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_dataset(DataConfig(name="text", root=str(root)), 0)
    with pytest.raises(DataError, match="tokenizer.json not found"):
        load_dataset(DataConfig(name="text", root=str(root), tokenizer=str(tmp_path)), 0)
    with pytest.raises(DataError, match="no column 'sentence'"):
        load_dataset(DataConfig(name="text", root=str(root), tokenizer=str(tokenizer), text_column="sentence"), 0)
    (tmp_path / "one").mkdir()
    write_jsonl(tmp_path / "one" / "train.jsonl", sentiment(20, 0))
    with pytest.raises(DataError, match="set data.test_size"):
        load_dataset(DataConfig(name="text", root=str(tmp_path / "one"), tokenizer=str(tokenizer), val_size=4), 0)
    with pytest.raises(DataError, match="no training data"):
        load_dataset(DataConfig(name="text", root=str(tmp_path / "d" / "nothing"), tokenizer=str(tokenizer)), 0)
