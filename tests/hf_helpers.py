"""A tiny randomly initialised Qwen2 written with save_pretrained, and text data for it (all offline)."""

from __future__ import annotations

from pathlib import Path

import torch

from text_helpers import sentiment, train_tokenizer, write_sentiment

QWEN = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
"""LIBRARY-NOTES' tiny Qwen2: 2 layers, 4 heads (2 key/value), width 64."""


def tiny_qwen(folder: Path, pad_token_id: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(pad_token_id=pad_token_id, **QWEN)).save_pretrained(str(folder))
    return folder


def tiny_text_task(root: Path) -> dict[str, Path]:
    """The model folder, a tokenizer folder (WordLevel, [PAD] = 0) and a sentiment data folder."""
    tokenizer = train_tokenizer(root / "tokenizer", [r["text"] for r in sentiment(200, 0)])
    return {"model": tiny_qwen(root / "qwen"), "tokenizer": tokenizer,
            "data": write_sentiment(root / "data", "jsonl", n_train=160, n_test=48)}


def tiny_lm_data(root: Path, n: int = 72) -> dict[str, Path]:
    """Alpaca-style instruction rows (JSON Lines) and a tokenizer that knows their words (and the prompt's)."""
    from text_helpers import alpaca, write_jsonl

    from lth_search.engine.text_data import ALPACA_PROMPT

    rows = alpaca(n)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    prompt = ALPACA_PROMPT.format(context=", paired with an input", instruction="say", input="### Input:\n")
    tokenizer = train_tokenizer(root / "lm_tokenizer", texts + [prompt])
    return {"tokenizer": tokenizer, "data": write_jsonl(root / "alpaca.jsonl", rows)}
