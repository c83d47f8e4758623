"""Where an experiment runs and writes: `resources` per trial, the stage `store`, MLflow `tracking`.

None of these enter a stage key: the same stages are found whatever machine computes
them and wherever they are tracked. A location is checked here (config/names.py) so
that a bad one fails at validation, before anything is written.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from lth_search.config.names import check_name, check_store_uri, check_tracking_uri
from lth_search.config.section import Section


class ResourcesConfig(Section):
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


class StoreConfig(Section):
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


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db"
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default $MLFLOW_EXPERIMENT_NAME, else the config name"
    )
    enabled: bool = True
    serve_batch: int = Field(64, ge=1, description="batch size at which the registered model's fastest form "
                             "(dense, CSR, BSR per layer) and each round's latency ratio are measured")
    measure_inference: bool = Field(True, description="log per round what the sparsity buys at inference "
                                    "(inference/* metrics: non-zeros, CSR export bytes, latency and peak memory "
                                    "against dense), as each round ends in a search of at most trial_plots "
                                    "lineages and a lone lineage, else for the best trial_plots trials at the "
                                    "search's finish; about inference_budget_s plus a model build per round")
    inference_budget_s: float = Field(0.2, gt=0, le=60, description="seconds of timing per round for the "
                                      "inference/* latency ratios (batch 1 and serve_batch), at most")
    inference_share: float = Field(0.1, gt=0, le=1, description="the timing of a round takes at most this "
                                   "fraction of the round's training time (inference_budget_s caps it): a "
                                   "round of a tiny network is not made several times slower by what it "
                                   "measures, and its latency ratios are the noisier for it")
    flush_s: float = Field(5.0, ge=0, le=3600, description="a trial's run sends what it logged at most every "
                           "flush_s seconds and at its end (a round that trains longer shows as it ends); "
                           "each send is a few MLflow requests, so a tiny lineage makes ~5 instead of ~12; "
                           "0 sends after every stage")
    trial_plots: int = Field(20, ge=0, description="a search of at most this many lineages plots each trial's "
                             "accuracy against sparsity and times its rounds' inference gains as it goes; a "
                             "larger one does both for its best trial_plots trials at its finish (a plot costs "
                             "~0.08 s of a slot, the timing a tenth of every round's training: more than a tiny "
                             "lineage's training between them); every trial's by_sparsity/* metrics chart its "
                             "curve in the MLflow UI anyway")

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str | None) -> str | None:
        return None if uri is None else check_tracking_uri(uri, "tracking.uri", ValueError)

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, experiment: str | None) -> str | None:
        # joined into the artifact folder beside the database: a name, never a path
        return None if experiment is None else check_name(experiment, "tracking.experiment", ValueError, max_len=100)
