"""The `data` section: which data set, where its files are, how the validation split is carved.

Only `identity()` enters stage keys: where the files are (`root`) does not change what
a stage computes, so moving the data folder reuses every stored stage.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from lth_search.config.names import check_location
from lth_search.config.section import RegisteredName, Section


class DataConfig(Section):
    """Which data set, where its files are, and how the validation split is carved."""

    name: RegisteredName = Field(
        "mnist1d",
        description="data set: built in (mnist1d, digits, mnist, fashion_mnist, cifar10; see engine/data.py), an "
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

    @field_validator("root")
    @classmethod
    def _root(cls, root: str) -> str:
        return check_location(root, "data.root", ValueError)

    def identity(self) -> dict[str, Any]:
        """What determines the split's content (the folder is where, not what; the MNIST-1D
        generator's size only matters for MNIST-1D)."""
        exclude = {"root"} if self.name == "mnist1d" else {"root", "mnist1d_samples"}
        return self.model_dump(exclude=exclude)
