"""Text data sets from standard files, tokenized by a local tokenizer: integer token ids out.

`data.name: text` classifies (a text column and a label column); `data.name: text_lm` is
causal language modelling, on Alpaca-style instruction data (`instruction`, `input`,
`output`: the loss is on the response only) or on a plain text column. `data.root` is

- a folder written by Hugging Face `datasets`' `save_to_disk` (a DatasetDict with train
  and test, or one Dataset): its Arrow files are read with pyarrow, so `datasets`
  itself need not be installed;
- a folder with `train.*` and `test.*` files, or one file, in Parquet, CSV, JSON Lines
  (`.jsonl`) or JSON (`.json`: JSON Lines or one array of records, as Alpaca ships).

Without a test split, `data.test_size` examples are carved off by a fixed draw (the same
for every seed: test never moves). The tokenizer is read from the local folder
`data.tokenizer`: with transformers' AutoTokenizer when the folder has a
`tokenizer_config.json` and transformers is installed, else with `tokenizers` from its
`tokenizer.json`. Nothing is downloaded. Sequences are truncated to `data.max_length`
and right-padded with the tokenizer's pad id.

A causal-LM example is `x` = token ids (max_length,) and `y` = the next token at each
position (max_length,), IGNORE (-100, what `nn.CrossEntropyLoss` skips) where there is
nothing to predict (the prompt, padding, the last position). A model's logits come as
(N, vocab, max_length), so the trainer's one cross-entropy serves both tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lth_search.config import DataConfig
from lth_search.errors import ConfigError, DataError

IGNORE = -100
"""Target of a position with nothing to predict (nn.CrossEntropyLoss's default ignore_index)."""
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
"""The Alpaca template (Taori et al. 2023); `{input}` is '### Input:\\n...\\n\\n' when the record has one."""
_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
_PAD_NAMES = ("[PAD]", "<pad>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Tokenizer:
    """What the data path needs of a tokenizer: texts -> ids, and its special ids."""

    encode: Callable[[list[str]], list[list[int]]]
    pad_id: int
    eos_id: int | None
    vocab_size: int


@dataclass
class TextData:
    """A text data set tokenized: raw arrays as engine/data.py takes them, and what a model needs."""

    raw: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int
    pad_id: int
    task: str
    """"classification" (y: class ids) or "causal_lm" (y: next-token ids, IGNORE where none)."""
    classes: list[str] | None = None


# Tokenizer ----------------------------------------------------------------------------------
def load_tokenizer(location: str | None) -> Tokenizer:
    """The tokenizer in the local folder (or tokenizer.json file) `location`."""
    if location is None:
        raise ConfigError("data.tokenizer: text data needs a tokenizer folder (tokenizer.json or a transformers "
                          "tokenizer saved with save_pretrained)")
    path = Path(location).expanduser()
    if (path / "tokenizer_config.json").is_file():
        try:
            import transformers  # noqa: F401
        except ImportError:
            pass
        else:
            return _auto_tokenizer(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"data.tokenizer: {file} not found; save a tokenizer there (tokenizers' Tokenizer.save, or "
                        "save_pretrained of a transformers tokenizer)")
    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError:
        raise DataError("data.tokenizer: the tokenizers package is not installed; pip install 'lth-search[hf]'") from None
    try:
        raw = RawTokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises its own exception type
        raise DataError(f"data.tokenizer: {file}: not a tokenizers file ({str(error)[:100]})") from None
    pad = next((raw.token_to_id(t) for t in _PAD_NAMES if raw.token_to_id(t) is not None), 0)
    eos = next((raw.token_to_id(t) for t in ("</s>", "<|endoftext|>", "[SEP]") if raw.token_to_id(t) is not None), None)
    return Tokenizer(lambda texts: [e.ids for e in raw.encode_batch(texts)], int(pad), eos,
                     raw.get_vocab_size(with_added_tokens=True))


def _auto_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"data.tokenizer: {path}: cannot load a tokenizer ({str(error).splitlines()[0][:120]})") from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Tokenizer(lambda texts: list(tok(texts)["input_ids"]), int(pad or 0), tok.eos_token_id, len(tok))


# Files --------------------------------------------------------------------------------------
def _read_table(file: Path) -> "Any":
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    try:
        if file.suffix == ".parquet":
            return pyarrow.parquet.read_table(file)
        if file.suffix == ".csv":
            return pyarrow.csv.read_csv(file)
        if file.suffix == ".json" and file.read_bytes().lstrip()[:1] == b"[":
            return pa.Table.from_pylist(json.loads(file.read_text()))
        return pyarrow.json.read_json(file)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"{file}: unreadable ({str(error).splitlines()[0][:120]})") from None


def _read_saved_dataset(folder: Path) -> "Any":
    """One split written by `datasets`' save_to_disk: Arrow IPC streams listed in state.json."""
    import pyarrow as pa

    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / Path(entry["filename"]).name for entry in state["_data_files"]]
        tables = []
        for file in files:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        return pa.concat_tables(tables)
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as error:
        raise DataError(f"{folder}: not a datasets save_to_disk folder ({str(error).splitlines()[0][:120]})") from None


def _split_file(folder: Path, split: str) -> Path | None:
    return next((folder / f"{split}{s}" for s in _SUFFIXES if (folder / f"{split}{s}").is_file()), None)


def read_tables(root: Path) -> tuple[Any, Any | None]:
    """(train table, test table or None) from `root` (see the module docstring)."""
    if root.is_file():
        return _read_table(root), None
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{root}: the saved DatasetDict has no train split (splits: {', '.join(splits)})")
        return _read_saved_dataset(root / "train"), (_read_saved_dataset(root / "test") if "test" in splits else None)
    if (root / "state.json").is_file():
        return _read_saved_dataset(root), None
    train = _split_file(root, "train")
    if train is None:
        raise DataError(f"{root}: no training data; give a datasets save_to_disk folder, train.(parquet|csv|jsonl|json) "
                        "(and test.*) in it, or one such file as data.root")
    test = _split_file(root, "test")
    return _read_table(train), (None if test is None else _read_table(test))


def _column(table: Any, name: str, where: str, field: str) -> list[Any]:
    if name not in table.column_names:
        raise DataError(f"{where}: no column {name!r} ({field}; columns: {', '.join(table.column_names)[:200]})")
    return table.column(name).to_pylist()


# Examples -----------------------------------------------------------------------------------
def _pad(rows: list[list[int]], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = row
    return out


def _classification(tables: list[Any], cfg: DataConfig, tok: Tokenizer, where: str) -> tuple[list, list, list[str] | None]:
    texts = [[str(t) for t in _column(t, cfg.text_column, where, "data.text_column")] for t in tables]
    labels = [_column(t, cfg.label_column, where, "data.label_column") for t in tables]
    flat = [v for part in labels for v in part]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in flat):
        if flat and min(flat) < 0:
            raise DataError(f"{where}: labels must be >= 0 (found {min(flat)}) in column {cfg.label_column!r}")
        ids, classes = labels, None
    else:
        classes = sorted({str(v) for v in flat})
        index = {name: i for i, name in enumerate(classes)}
        ids = [[index[str(v)] for v in part] for part in labels]
    xs = [_pad(tok.encode(part), cfg.max_length, tok.pad_id) for part in texts]
    return xs, [np.asarray(part, dtype=np.int64) for part in ids], classes


def _prompt_and_response(table: Any, cfg: DataConfig, where: str) -> tuple[list[str], list[str]]:
    if {"instruction", "output"} <= set(table.column_names):
        instructions, outputs = table.column("instruction").to_pylist(), table.column("output").to_pylist()
        inputs = table.column("input").to_pylist() if "input" in table.column_names else [""] * len(outputs)
        prompts = [
            ALPACA_PROMPT.format(
                context=", paired with an input that provides further context" if extra else "",
                instruction=instruction, input=f"### Input:\n{extra}\n\n" if extra else "")
            for instruction, extra in zip(instructions, inputs)
        ]
        return prompts, [str(o) for o in outputs]
    texts = _column(table, cfg.text_column, where, "data.text_column (or Alpaca's instruction/input/output)")
    return [""] * len(texts), [str(t) for t in texts]


def _causal(table: Any, cfg: DataConfig, tok: Tokenizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and next-token targets; the loss covers the response (and its end token) only."""
    prompts, responses = _prompt_and_response(table, cfg, where)
    whole = tok.encode([p + r for p, r in zip(prompts, responses)])
    prompt_lengths = [len(ids) if p else 0 for p, ids in zip(prompts, tok.encode(prompts))]
    end = [tok.eos_id] if tok.eos_id is not None and tok.eos_id != tok.pad_id else []
    rows = [ids + end for ids in whole]
    x = _pad(rows, cfg.max_length, tok.pad_id)
    y = np.full_like(x, IGNORE)
    for i, (ids, start) in enumerate(zip(rows, prompt_lengths)):
        last = min(len(ids), cfg.max_length)  # positions t < last - 1 predict token t + 1
        begin = max(start - 1, 0)
        if last - 1 > begin:
            y[i, begin : last - 1] = x[i, begin + 1 : last]
    return x, y


def _carve_test(x: np.ndarray, y: np.ndarray, size: int, where: str) -> tuple[np.ndarray, ...]:
    if size == 0:
        raise DataError(f"{where}: no test split in the files; set data.test_size to carve one off")
    if size >= len(x):
        raise DataError(f"data.test_size: {size} must be < the {len(x)} examples of {where}")
    perm = np.random.RandomState(0).permutation(len(x))
    test, train = np.sort(perm[:size]), np.sort(perm[size:])
    return x[train], y[train], x[test], y[test]


def read_text(cfg: DataConfig) -> TextData:
    """The text data set of `cfg` (data.name text or text_lm), tokenized and split."""
    root = Path(cfg.root).expanduser().resolve()
    where = str(root)
    tok = load_tokenizer(cfg.tokenizer)
    train, test = read_tables(root)
    tables = [train] if test is None else [train, test]
    if cfg.name == "text":
        xs, ys, classes = _classification(tables, cfg, tok, where)
        task = "classification"
    else:
        pairs = [_causal(t, cfg, tok, where) for t in tables]
        xs, ys, classes = [p[0] for p in pairs], [p[1] for p in pairs], None
        task = "causal_lm"
    raw = (xs[0], ys[0], xs[1], ys[1]) if test is not None else _carve_test(xs[0], ys[0], cfg.test_size, where)
    if task == "classification":
        labels = np.concatenate([raw[1], raw[3]])
        num_classes = len(classes) if classes is not None else int(labels.max()) + 1 if len(labels) else 0
    else:
        num_classes = tok.vocab_size
    return TextData(raw, (cfg.max_length,), num_classes, tok.vocab_size, tok.pad_id, task, classes)
