"""Tiny text data and tokenizers made offline, in the real formats (tokenizers, datasets, Parquet, JSONL)."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = {0: ["bad", "awful", "poor", "sad", "dull"], 1: ["good", "great", "fine", "happy", "bright"]}
FILLER = ["the", "film", "was", "a", "very", "and", "plot", "it"]


def sentiment(n: int, seed: int) -> list[dict[str, object]]:
    """Toy sentiment rows: the label is which word list the sentiment words come from."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [rng.choice(WORDS[label]) for _ in range(2)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def alpaca(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"say {w}", "input": "" if i % 2 else "twice", "output": f"{w} {w}"}
            for i, w in enumerate((FILLER + WORDS[0] + WORDS[1]) * (n // 18 + 1))][:n]


def train_tokenizer(folder: Path, texts: list[str], kind: str = "wordlevel", transformers_files: bool = True) -> Path:
    """A tokenizer trained offline on `texts`, saved as tokenizer.json (and, with
    `transformers_files`, as a transformers fast tokenizer with its pad and eos tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["[PAD]", "[UNK]", "</s>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials)
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    if transformers_files:
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
        fast.save_pretrained(str(folder))
    else:
        tok.save(str(folder / "tokenizer.json"))
    return folder


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sentiment(root: Path, fmt: str, n_train: int = 64, n_test: int = 32) -> Path:
    """train/test in `fmt` (jsonl, csv, parquet, or datasets: a save_to_disk DatasetDict) under `root`."""
    train, test = sentiment(n_train, 0), sentiment(n_test, 1)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "datasets":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                              "test": datasets.Dataset.from_list(test)}).save_to_disk(str(root))
    elif fmt == "jsonl":
        write_jsonl(root / "train.jsonl", train)
        write_jsonl(root / "test.jsonl", test)
    else:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        for name, rows in (("train", train), ("test", test)):
            table = pa.Table.from_pylist(rows)
            if fmt == "csv":
                pyarrow.csv.write_csv(table, root / f"{name}.csv")
            else:
                pyarrow.parquet.write_table(table, root / f"{name}.parquet")
    return root
