"""The `data` section: which data set, where its files are, how the validation split is carved.

Only `identity()` enters stage keys: where the files are (`root`, `tokenizer`) does not
change what a stage computes, so moving the data folder reuses every stored stage (the
data's fingerprint, over the token ids a text data set becomes, names the content).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from lth_search.config.names import check_location
from lth_search.config.section import RegisteredName, Section

TEXT_DATA = ("text", "text_lm")
"""Built-in text data sets: `text` classifies, `text_lm` is causal language modelling."""
TEXT_FIELDS = ("max_length", "text_column", "label_column", "test_size")


class DataConfig(Section):
    """Which data set, where its files are, and how the validation split is carved."""

    name: RegisteredName = Field(
        "mnist1d",
        description="data set: built in (mnist1d, digits, mnist, fashion_mnist, cifar10; see engine/data.py; text "
        "and text_lm, read from data.root and tokenized, see engine/text_data.py), an "
        "entry point of group lth_search.data, or package.module:factory returning (x_train, y_train, x_test, y_test)",
    )
    root: str = Field(
        "~/.cache/lth_search/data",
        description="folder with the standard files (MNIST IDX, CIFAR-10 python batches); "
        "also where MNIST-1D is cached after its first offline build",
    )
    val_size: int = Field(
        1000,
        ge=1,
        le=10**7,
        description="training examples held out (seeded) as the validation split; selection uses "
        "it, reporting uses test. Its size sets the noise of a 'matching' verdict: the standard "
        "error of an accuracy p is sqrt(p(1-p)/val_size), ~1.5 pp at 1000 examples and 65%.",
    )
    mnist1d_samples: int = Field(
        5000,
        ge=100,
        le=10**7,
        multiple_of=10,
        description="MNIST-1D only: examples the offline generator makes, split 80/20 into the training pool "
        "(val_size of it become the validation split) and test, as mnist1d does; 5000 is the published data "
        "set. More examples let the validation split grow without shrinking the training set.",
    )
    normalize: bool = Field(True, description="standardise inputs with the training split's mean and std")
    tokenizer: str | None = Field(
        None, description="text / text_lm: the tokenizer's local folder (tokenizer.json, or what transformers' "
        "AutoTokenizer reads; for an hf: model usually the model's own folder). Nothing is downloaded"
    )
    max_length: int = Field(128, ge=2, le=1 << 17, description="text / text_lm: tokens per example (padded or truncated)")
    text_column: str = Field("text", min_length=1, max_length=128, description="text: the column with the text")
    label_column: str = Field(
        "label", min_length=1, max_length=128,
        description="text: the column with the class (integers 0..C-1, or strings: classes in sorted order)",
    )
    test_size: int = Field(
        0, ge=0, le=10**7, description="text / text_lm whose files have no test split: examples carved off as test "
        "(a fixed draw, the same for every seed); 0 = the files must hold a test split"
    )

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, tokenizer: str | None) -> str | None:
        return None if tokenizer is None else check_location(tokenizer, "data.tokenizer", ValueError)

    @field_validator("root")
    @classmethod
    def _root(cls, root: str) -> str:
        return check_location(root, "data.root", ValueError)

    def identity(self) -> dict[str, Any]:
        """What determines the split's content (the folder is where, not what; the MNIST-1D
        generator's size only matters for MNIST-1D)."""
        exclude = {"root", "tokenizer"}
        if self.name != "mnist1d":
            exclude.add("mnist1d_samples")
        if self.name not in TEXT_DATA:
            exclude |= set(TEXT_FIELDS)
        return self.model_dump(exclude=exclude)
