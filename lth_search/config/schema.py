"""The experiment configuration: one pydantic schema that validates, documents and hashes.

Like open_lth's hyperparameter dataclasses, the schema is the single source of truth:
defaults live here and nowhere else, `--set a.b=value` overrides address its fields by
dotted path, and the canonical JSON of (parts of) it is what stage keys are hashed from.
Unlike open_lth, every field is hashed (not only non-default ones), so changing a
default can never silently alias an old stored stage with a new meaning.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lth_search.config.names import check_location, check_name, check_store_uri, check_tracking_uri, quote
from lth_search.errors import ConfigError

_NAME_RE = re.compile(r"^([A-Za-z_][\w.-]*|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")
"""A registered name (built in or an entry point) or an import target package.module:factory.
Which names exist is the registries' business (engine/data.py, engine/models.py)."""


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"must be a registered name or an import target package.module:factory, got {value!r}")
    return value

Steps = Union[int, str]
"""A training length: an iteration count (int or "500it") or epochs ("2ep")."""

_STEPS_RE = re.compile(r"\s*(\d{1,12})\s*(it|ep)\s*")
MAX_STEPS = 10**8
"""Upper bound of any iteration count (~3 years at 1000 steps/s): larger is a typo, not a plan."""
MAX_EPOCHS = 10**5
MAX_SEED = 2**32 - 1
MAX_WIDTH = 16384
MAX_HIDDEN_WEIGHTS = 10**8
"""Hidden-to-hidden weights of an `mlp` (400 MB in float32); more is a MemoryError, not a model."""
MAX_LIST = 64
"""Longest list of widths, milestones, rewind steps or search values."""


class _Section(BaseModel):
    """Every section: unknown keys refused, NaN and infinities refused in every float field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


def _check_steps(value: Steps, field: str) -> Steps:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an iteration count or a string like '500it' or '2ep'")
    if isinstance(value, int):
        if not 0 <= value <= MAX_STEPS:
            raise ValueError(f"{field} must be an iteration count in [0, {MAX_STEPS}], got {value}")
        return value
    match = _STEPS_RE.fullmatch(value)
    if not match:
        raise ValueError(f"{field} must be an iteration count or a string like '500it' or '2ep', got {quote(value)}")
    count, unit = int(match.group(1)), match.group(2)
    limit = MAX_STEPS if unit == "it" else MAX_EPOCHS
    if count > limit:
        raise ValueError(f"{field} must be at most {limit}{unit}, got {quote(value)}")
    return value


def resolve_steps(value: Steps, steps_per_epoch: int) -> int:
    """Canonical iteration count of a length given as int, "Nit" or "Nep".

    Stage keys hash the resolved count, so "2ep" and the equivalent "Nit" share stages.
    """
    if isinstance(value, int):
        return value
    match = _STEPS_RE.fullmatch(value)
    assert match, value
    count, unit = int(match.group(1)), match.group(2)
    return count if unit == "it" else count * steps_per_epoch


class DataConfig(_Section):
    """Which data set, where its files are, and how the validation split is carved."""

    name: str = Field(
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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("root")
    @classmethod
    def _root(cls, root: str) -> str:
        return check_location(root, "data.root", ValueError)

    def identity(self) -> dict[str, Any]:
        """What determines the split's content (the folder is where, not what; the MNIST-1D
        generator's size only matters for MNIST-1D)."""
        exclude = {"root"} if self.name == "mnist1d" else {"root", "mnist1d_samples"}
        return self.model_dump(exclude=exclude)


class ModelConfig(_Section):
    """Architecture. Initialisation is seeded by the experiment seed."""

    name: str = Field(
        "mlp",
        description="model: built in (mlp, lenet_300_100, conv2/4/6, resnet20, vgg16; see engine/models.py), an "
        "entry point of group lth_search.models, or package.module:factory(input_shape, num_classes) -> nn.Module",
    )
    widths: list[int] = Field([100, 100], max_length=MAX_LIST, description="hidden widths of `mlp`")
    width: int = Field(16, ge=1, le=1024, description="base width of resnet20 (16 = the paper's)")
    batch_norm: bool = Field(True, description="batch norm in vgg16")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(not 1 <= w <= MAX_WIDTH for w in widths):
            raise ValueError(f"every width must be in [1, {MAX_WIDTH}], got {quote(widths)}")
        hidden = sum(a * b for a, b in zip(widths, widths[1:]))
        if hidden > MAX_HIDDEN_WEIGHTS:
            raise ValueError(f"{hidden} hidden weights; at most {MAX_HIDDEN_WEIGHTS} (use narrower layers)")
        return widths


class TrainConfig(_Section):
    """The training recipe, used for the dense stage and for every round's retraining."""

    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-2, gt=0, le=100)
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(100, ge=1, le=2**20)
    steps: Steps = Field(1500, description="training length T per stage: iterations or 'Nep'")
    schedule: Literal["constant", "step", "cosine"] = "constant"
    milestones: list[Steps] = Field([], max_length=MAX_LIST, description="step schedule: lr x gamma at each of these steps")
    gamma: float = Field(0.1, gt=0, le=100)
    warmup_steps: Steps = Field(0, description="linear lr warmup length")
    augment: Literal["none", "crop_flip"] = Field(
        "none", description="training augmentation: crop_flip = random 4-pixel-padded crops + horizontal flips (CIFAR)"
    )
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda or cuda:N")
    eval_batch_size: int = Field(2000, ge=1, le=2**20)

    @field_validator("steps", "warmup_steps")
    @classmethod
    def _steps(cls, value: Steps, info: Any) -> Steps:
        return _check_steps(value, f"train.{info.field_name}")

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, values: list[Steps]) -> list[Steps]:
        return [_check_steps(v, "train.milestones") for v in values]

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {quote(value)}")
        return value

    def recipe(self) -> dict[str, Any]:
        """What determines training results (device and eval batching do not)."""
        return self.model_dump(exclude={"device", "eval_batch_size"})


KINDS = ("imp", "lr_rewind", "finetune", "oneshot", "random_prune", "random_reinit", "snip", "grasp", "synflow")
"""Lineage kinds (engine/kinds.py): IMP with weight rewinding and the baselines it is compared with."""
RESCALE_MODES = ("measured", "calibrated")
InitScale = Union[float, Literal[RESCALE_MODES]]


def check_init_scale(value: Any) -> InitScale:
    """The one rule for a rescale mode: an exponent alpha in [0, 2], 'measured' or 'calibrated'."""
    if value in RESCALE_MODES:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a number (the rescale exponent alpha), 'measured' or 'calibrated', got {quote(value)}")
    if not 0 <= value <= 2:
        raise ValueError(f"must lie in [0, 2] (0 plain rewind, 1 full 1/sqrt(density)), got {value}")
    return float(value)


class PruneConfig(_Section):
    """Iterative magnitude pruning: what each round removes and where survivors rewind to."""

    kind: Literal[KINDS] = Field(
        "imp",
        description="lineage kind: imp (weight rewinding), lr_rewind (retrain the end weights with the schedule "
        "rewound to rewind_step), finetune (retrain the end weights at the final learning rate), oneshot "
        "(magnitude-prune the dense end weights once per sparsity, rewind), random_prune / random_reinit (the "
        "controls of each IMP round), snip / grasp / synflow (prune at theta_k, train); every kind other than "
        "imp and the iterative lr_rewind / finetune is trained at the IMP lineage's sparsities",
    )
    rounds: int = Field(
        20, ge=0, le=200, description="the most pruning rounds after the dense stage (a cap: a lineage stops earlier "
        "when its matching run ends, see patience, or when it reaches target_sparsity)"
    )
    patience: int = Field(
        2, ge=1, le=200, description="consecutive rounds a lineage may fail to match dense before it stops: a pass "
        "after fewer misses continues its unbroken matching run, after this many it does not count. 1 = stop at the "
        "first miss"
    )
    target_sparsity: float | None = Field(
        None, gt=0, lt=1, description="stop once a round reaches this sparsity (null: prune until the run ends or the cap)"
    )
    dense_replicates: int = Field(
        3, ge=1, le=64, description="dense networks (the lineage's own seed, then seed+1, ...) trained on the same "
        "split; a round matches when its val accuracy, example by example, is within search.tolerance of their mean. "
        "Each is a normal dense stage, stored and shared through the store"
    )
    rate: float = Field(0.2, gt=0, lt=1, description="fraction of the remaining weights pruned per round")
    scope: Literal["global", "layerwise"] = "global"
    layer_ratios: dict[str, float] = Field(
        {}, max_length=MAX_LIST, description="rate multiplier per layer group (conv, fc, output, shortcut, ...)"
    )
    output_ratio: float = Field(
        1.0, gt=0, le=100, description="rate multiplier of the output layer (0.5 in Frankle & Carbin)"
    )
    rewind_step: int = Field(0, ge=0, le=MAX_STEPS, description="iteration k the survivors rewind to")
    rewind_steps: list[int] = Field(
        [0], max_length=MAX_LIST,
        description="rewind steps the dense stage keeps (theta_k for each); the search picks among them",
    )
    init_scale: InitScale = Field(
        0.0,
        description="rescale at rewind: a number alpha gives w *= density^(-alpha/2) (0 plain rewind, 1 "
        "variance correction for random masks); 'measured' restores each layer's sum of squares; 'calibrated' "
        "restores each layer's pre-activation variance on a batch of training inputs, layer by layer",
    )

    @field_validator("init_scale", mode="before")
    @classmethod
    def _init_scale(cls, value: Any) -> InitScale:
        return check_init_scale(value)

    @field_validator("layer_ratios")
    @classmethod
    def _ratios(cls, ratios: dict[str, float]) -> dict[str, float]:
        for group, ratio in ratios.items():
            check_name(group, "layer group", ValueError, max_len=32)
            if not 0 < ratio <= 100:
                raise ValueError(f"ratio of group {group!r} must be in (0, 100], got {ratio}")
        return ratios

    @field_validator("rewind_steps")
    @classmethod
    def _rewind_steps(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 <= s <= MAX_STEPS for s in steps):
            raise ValueError(f"must be a non-empty list of iterations in [0, {MAX_STEPS}]")
        return sorted(set(steps))

    @model_validator(mode="after")
    def _rewind_kept(self) -> "PruneConfig":
        if self.rewind_step not in self.rewind_steps:
            raise ValueError(
                f"prune.rewind_step: {self.rewind_step} is not a kept rewind step "
                f"(prune.rewind_steps = {self.rewind_steps}); add it to prune.rewind_steps"
            )
        return self

    def choices(self) -> dict[str, Any]:
        """The per-round pruning choices that enter a round's stage key."""
        return self.model_dump(include={"rate", "scope", "layer_ratios", "output_ratio", "rewind_step", "init_scale"})


class DiagnosticsConfig(_Section):
    """Why a ticket wins (engine/diagnostics.py): computed per round, logged beside the accuracies."""

    enabled: bool = Field(
        True, description="sign preservation, trajectory alignment and layer health per round (cheap: no training)"
    )
    probe_size: int = Field(1024, ge=1, description="training examples of the fixed probe batch (gradient at theta_k)")
    stability: bool = Field(
        False, description="linear-mode-connectivity instability per round: trains a second copy from theta_k "
        "with another data order (doubles a round)",
    )
    stability_points: int = Field(5, ge=2, le=101, description="interpolation points on the line between the copies")
    stability_steps: list[int] = Field(
        [], description="rewind steps k (kept ones, prune.rewind_steps) for the dense instability probe of "
        "`lth-search compare`: two dense copies from theta_k with different data orders, their error barrier"
    )
    perturbation: float | None = Field(
        None, gt=0, description="retrain from theta_k plus Gaussian noise of this scale (relative to each layer's "
        "kept-weight std) on the kept weights; off when null",
    )
    collapse_ratio: float = Field(0.05, gt=0, lt=1, description="a layer keeping less than this share of the "
                                  "network's kept fraction is reported as collapsed")
    deviation_bound: float = Field(0.25, gt=0, le=1, description="warn when a layer's sparsity is further than this "
                                   "from the target")


class AshaConfig(_Section):
    """Early stopping that is fair across pruning rates.

    ASHA compares lineages at equal *sparsity*, not at equal round: its clock is the
    sparsity level (how many 20 % prunes the remaining weights amount to, so 48.8 % is
    level 3 whatever the rate), and its yardstick is the val accuracy margin over dense
    there. A slow pruner is never cut for being slow, only for being worse at the
    sparsity both reached. A stopped lineage is told to Optuna as pruned.
    """

    enabled: bool = True
    grace_period: int = Field(
        3, ge=1, le=200,
        description="sparsity level (20 %-prunes: 3 = 48.8 %) every lineage reaches before it can be stopped",
    )
    reduction_factor: float = Field(2.0, gt=1, le=100)


class SearchSpace(_Section):
    """Values the search may pick; a key left out (null) is fixed at its `prune` value."""

    kind: list[Literal[KINDS]] | None = Field(
        None, max_length=MAX_LIST, description="lineage kinds to choose among (prune.kind), e.g. [imp, lr_rewind]"
    )
    rewind_step: list[int] | None = Field(None, max_length=MAX_LIST)
    rate: list[float] | None = Field(None, max_length=MAX_LIST)
    scope: list[Literal["global", "layerwise"]] | None = None
    layer_ratios: dict[str, list[float]] | None = Field(None, max_length=MAX_LIST)
    init_scale: list[InitScale] | None = None

    @field_validator("init_scale", mode="before")
    @classmethod
    def _scales(cls, values: Any) -> Any:
        if values is None:
            return None
        if not isinstance(values, list) or not 0 < len(values) <= MAX_LIST:
            raise ValueError(f"must be a non-empty list (at most {MAX_LIST}) of exponents, 'measured' or 'calibrated'")
        return [check_init_scale(v) for v in values]

    @field_validator("rate")
    @classmethod
    def _rates(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and (not values or any(not 0 < v < 1 for v in values)):
            raise ValueError("must be a non-empty list of rates in (0, 1)")
        return values

    @field_validator("kind", "rewind_step", "scope")
    @classmethod
    def _non_empty(cls, values: list | None) -> list | None:
        if values is not None and not values:
            raise ValueError("must be a non-empty list (or null to keep it fixed)")
        return values

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios(cls, ratios: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for group, values in (ratios or {}).items():
            check_name(group, "layer group", ValueError, max_len=32)
            if not 0 < len(values) <= MAX_LIST or any(not 0 < v <= 100 for v in values):
                raise ValueError(f"group {group!r} needs a non-empty list of multipliers in (0, 100]")
        return ratios


class SearchConfig(_Section):
    num_trials: int = Field(12, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    sampler: Literal["auto", "exhaustive", "tpe", "nsga2", "random"] = Field(
        "auto",
        description="auto: exhaustive (every recipe once) when num_trials covers the space, else TPE with its "
        "random start-up sized to the budget; nsga2 for two objectives; all seeded",
    )
    objectives: int = Field(1, ge=1, le=2, description="1: matching sparsity; 2: plus val accuracy at it")
    tolerance: float = Field(
        0.01, ge=0, lt=1, description="a round matches when its val accuracy >= the dense replicates' mean val "
        "accuracy on the same examples - tolerance; keep it >= twice the standard error of that paired difference "
        "(reported per round as margin_se)"
    )
    max_failures: int = Field(2, ge=0, le=100, description="Ray retries of a failed trial")
    confirm_seeds: int = Field(
        3, ge=0, le=20,
        description="after the search, the top recipes and the default recipe are re-run on this many seeds the "
        "search never used; the best ticket is the recipe with the best confirmed score (0: no confirmation)",
    )
    confirm_top_k: int = Field(3, ge=1, le=20, description="how many of the search's best recipes are confirmed")
    confirm_margin: float = Field(
        1.1, ge=1.0, le=10.0,
        description="a searched recipe replaces the default only when its confirmed geometric-mean compression "
        "is at least this many times the default's (selection noise must not pick a recipe)",
    )
    asha: AshaConfig = AshaConfig()
    space: SearchSpace = SearchSpace()


class ResourcesConfig(_Section):
    cpu: float = Field(1.0, gt=0, le=1024, description="CPUs per trial")
    gpu: float = Field(0.0, ge=0, le=64, description="GPUs per trial: 0 (CPU), a fraction such as 0.25, or 1")
    gpu_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="per-process CUDA memory cap; defaults to `gpu` when it is fractional"
    )
    pack: int = Field(
        8, ge=1, le=256,
        description="most lineages (or dense replicates) one worker trains together as one batched pack "
        "(engine/packs.py): a lineage's dense replicates, the confirmation runs; 1 trains them one by one",
    )


class StoreConfig(_Section):
    uri: str | None = Field(
        None,
        description="stage store root: a path, a pyarrow URI (s3://, gs://, hdfs://, abfs://) or any "
        "other fsspec protocol (sftp://, ...); default <output_dir>/store",
    )
    lease_timeout_s: float = Field(
        120.0, gt=0, le=86400, description="a lease not renewed for this long is taken over"
    )
    heartbeat_s: float = Field(5.0, gt=0, le=3600)

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_store_uri(uri, "store.uri", ValueError)

    @model_validator(mode="after")
    def _heartbeat(self) -> "StoreConfig":
        if self.heartbeat_s >= self.lease_timeout_s:
            raise ValueError(
                f"store.heartbeat_s ({self.heartbeat_s:g}) must be smaller than store.lease_timeout_s "
                f"({self.lease_timeout_s:g})"
            )
        return self


class TrackingConfig(_Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db"
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default $MLFLOW_EXPERIMENT_NAME, else the config name"
    )
    enabled: bool = True

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri, "tracking.uri", ValueError)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, experiment: str | None) -> str | None:
        # joined into the artifact folder beside the database: a name, never a path
        return None if experiment is None else check_name(experiment, "tracking.experiment", ValueError, max_len=100)


class ExperimentConfig(_Section):
    """A whole experiment: what `lth-search run`, `lineage` and the store agree on."""

    name: str = Field("quickstart", description="search name: MLflow experiment and resume handle")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seeds data split, batch order, model init and the sampler")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = Field("./lth_runs", description="mlflow.db, store/, ray/ go here (made absolute at start)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return check_name(name, "name", ValueError, max_len=100)

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, output_dir: str) -> str:
        return check_location(output_dir, "output_dir", ValueError)

    @model_validator(mode="after")
    def _space_within_kept(self) -> "ExperimentConfig":
        steps = self.search.space.rewind_step
        if steps is not None:
            missing = sorted(set(steps) - set(self.prune.rewind_steps))
            if missing:
                raise ValueError(
                    f"search.space.rewind_step: {missing} not kept by the dense stage "
                    f"(prune.rewind_steps = {self.prune.rewind_steps}); add them there"
                )
        if isinstance(self.train.steps, int):
            late = [s for s in self.prune.rewind_steps if s >= self.train.steps]
            if late:
                raise ValueError(f"prune.rewind_steps: {late} must be < train.steps ({self.train.steps})")
        for key, value in self.default_recipe().items():
            candidates = self.searched_values()[key]
            if value not in candidates:
                raise ValueError(
                    f"search.space.{key.replace('/', '.')}: {candidates} must include the default recipe's "
                    f"{value!r} (prune.{key.split('/')[0]}): the default recipe is a trial of every search"
                )
        return self

    # The search space --------------------------------------------------------------------
    def searched_values(self) -> dict[str, list[Any]]:
        """Each searched choice name ("rate", "layer_ratios/output", ...) with its candidates."""
        space = self.search.space
        values: dict[str, list[Any]] = {}
        for key in ("kind", "rewind_step", "rate", "scope", "init_scale"):
            candidates = getattr(space, key)
            if candidates is not None:
                values[key] = list(candidates)
        for group, candidates in (space.layer_ratios or {}).items():
            values[f"layer_ratios/{group}"] = list(candidates)
        return values

    def default_recipe(self) -> dict[str, Any]:
        """The config's own prune values for every searched choice: plain IMP as configured.

        It is enqueued as a trial of every search and confirmed beside the search's best,
        so a summary can say what searching gained over not searching.
        """
        recipe: dict[str, Any] = {}
        for key in self.searched_values():
            if key.startswith("layer_ratios/"):
                recipe[key] = self.prune.layer_ratios.get(key.split("/", 1)[1], 1.0)
            else:
                recipe[key] = getattr(self.prune, key)
        return recipe

    @model_validator(mode="after")
    def _stability_steps_kept(self) -> "ExperimentConfig":
        missing = sorted(set(self.diagnostics.stability_steps) - set(self.prune.rewind_steps))
        if missing:
            raise ValueError(
                f"diagnostics.stability_steps: {missing} not kept by the dense stage "
                f"(prune.rewind_steps = {self.prune.rewind_steps}); add them there"
            )
        return self

    # Paths -------------------------------------------------------------------------------
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def store_uri(self) -> str:
        return self.store.uri or str(self.output_path() / "store")

    def tracking_uri(self) -> str:
        """`tracking.uri`, else MLflow's own `MLFLOW_TRACKING_URI`, else the sqlite file in output_dir.

        The one place the tracking URI is decided: an explicit config value wins over the
        environment, as MLflow's conventions have it, and every command reads it here.
        """
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.output_path() / 'mlflow.db'}"

    def experiment_name(self) -> str:
        """`tracking.experiment`, else MLflow's `MLFLOW_EXPERIMENT_NAME`, else the config name."""
        return self.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.name

    def absolute(self) -> "ExperimentConfig":
        """A copy whose paths are absolute and whose tracking target is resolved.

        Ray trials chdir into their own folders, and on a cluster they run on nodes that do
        not share the driver's environment: the MLflow URI and experiment the driver sees
        (config, else MLFLOW_* variables) are written into the copy so that every trial,
        and a resumed search, logs to the same place.
        """
        copy = self.model_copy(deep=True)
        copy.tracking.uri = self.tracking_uri()
        copy.tracking.experiment = self.experiment_name()
        copy.output_dir = str(self.output_path())
        copy.data.root = str(Path(self.data.root).expanduser().resolve())
        if copy.store.uri and "://" not in copy.store.uri:
            copy.store.uri = str(Path(copy.store.uri).expanduser().resolve())
        return copy

    def with_choices(self, choices: dict[str, Any]) -> "ExperimentConfig":
        """A copy with search choices (keys of PruneConfig) applied, validated again."""
        data = self.model_dump()
        prune = data["prune"]
        for key, value in choices.items():
            if key.startswith("layer_ratios/"):
                prune["layer_ratios"][key.split("/", 1)[1]] = value
            else:
                prune[key] = value
        return validate_config(data, source="search choices")


# Validation ---------------------------------------------------------------------------------
def _format_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-after"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] in ("literal_error", "value_error") or "got" in message or isinstance(item.get("input", {}), dict):
            pass
        else:
            message += f" (got {quote(item['input'])})"
        key = key if len(key) <= 100 else key[:100] + "..."
        parts.append(f"{key}: {message}" if key and not message.startswith(key) else message)
    more = f"; and {len(parts) - 5} more" if len(parts) > 5 else ""
    return f"{source}: " + "; ".join(parts[:5]) + more


def validate_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict, raising ConfigError with one line naming each bad key."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_error(error, source)) from None


def default_output_dir() -> str:
    """The schema's `output_dir` default, for commands that name a search instead of a config."""
    return ExperimentConfig.model_fields["output_dir"].default
