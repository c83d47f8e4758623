"""The child run of one trial (also the run of one `lth-search lineage`), logged as it goes
(sent every `tracking.flush_s` and at its end: pending.py).

Tags ``mlflow.parentRunId``, ``lth.role=trial``, ``lth.trial_id``, ``lth.tolerance``,
``lth.rewind_step``, ``lth.input_shape``, ``lth.num_classes`` (so a ticket is rebuilt
without loading data), ``lth.search_id``, ``lth.optuna_trial``, source and git; the
trial's choices as params; metrics ``dense_val_accuracy`` ... at step 0; per round
(step = round) ``val_accuracy``, ``test_accuracy``, ``sparsity``,
``layer_sparsity/<layer>``, ``train_loss``, ``train_steps_per_s``, ``reused``, what the
sparsity buys at inference ``inference/<name>`` (engine/sparsity_gains.py: non-zeros, CSR
export bytes, latency ratios at batch 1 and tracking.serve_batch, peak memory ratio; when
tracking.measure_inference, and in a search of more than tracking.trial_plots lineages only
for its best trials, at its finish: `trials_detailed_live`); artifacts
``config.json``, ``weights/rewind_<k>.safetensors`` (once), ``masks/round_NN.parquet``
(codec.encode_mask), ``weights/trained_round_NN.safetensors`` (the round's trained end
weights), ``plots/accuracy_vs_sparsity.png``; ``by_sparsity/val_accuracy`` and
``by_sparsity/test_accuracy`` at step = sparsity in permille (dense at 0), the series
the UI charts as accuracy against sparsity; the data set as a run input (digest = its
fingerprint); at the end summary metrics ``matching_sparsity``, ``matching_round``,
``best_val_accuracy``, ... (names: layout.py).

Nothing here raises into a lineage: every call goes through `MlflowIO` (retries, then
a warning). Logging is idempotent: a retried trial, a resumed search or a sync continue
the same run (found by its ``lth.trial_id`` tag) and log only what `RunState` says it
lacks, which is how sync.py fills in from the store what MLflow missed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.engine.data import data_signature
from lth_search.engine.lineage.metric import metric_named
from lth_search.engine.lineage.results import LineageResult, RoundResult
from lth_search.runs.record import TrialStatus
from lth_search.store.entry import StageEntry
from lth_search.tracking.client import MlflowIO, flatten, metric_history
from lth_search.tracking.describe import data_input, run_description, search_tags, source_tags
from lth_search.tracking.layout import (
    COMPLETE,
    CONFIG,
    INPUT_SHAPE,
    LINEAGE_PLOT,
    MASK_RE,
    NUM_CLASSES,
    PARENT,
    REWIND_STEP,
    ROLE,
    SEARCH_NAME,
    FAILED,
    STATUS,
    METRIC,
    TOLERANCE,
    TRAINED_RE,
    TRIAL_ID,
    dense_metrics,
    mask_artifact,
    mask_layers_artifact,
    mask_layers_csv,
    rewind_artifact,
    sparsity_series,
    sparsity_step,
    summary_metrics,
    trained_artifact,
)
from lth_search.tracking.links import sync_hint
from lth_search.tracking.pending import PendingLog
from lth_search.tracking.plots import lineage_plot
from lth_search.tracking.round_metrics import RoundMetrics

log = logging.getLogger(__name__)

TERMINAL = {
    TrialStatus.FINISHED: "FINISHED", TrialStatus.STOPPED: "FINISHED", TrialStatus.ERROR: "FAILED",
}
"""Trial record status -> MLflow run status; other statuses leave the run RUNNING."""


def trials_detailed_live(cfg: ExperimentConfig) -> bool:
    """Whether a search's trials plot themselves and time each round's inference gains as they go: at
    most `tracking.trial_plots` lineages. A larger search does both for its best `trial_plots` trials
    at its finish (sync.py `detailed_trials`): the timing is a tenth of every round's training time
    in the trial's slot (round_metrics.py `inference_budget`), spent on every lineage of a search of
    thousands while its best few are those a researcher deploys or compares."""
    return cfg.search.num_trials <= cfg.tracking.trial_plots


@dataclass
class RunState:
    """What a run already holds, so that logging again adds nothing twice."""

    rounds: set[int] = field(default_factory=set)
    masks: set[int] = field(default_factory=set)
    trained: set[int] = field(default_factory=set)
    dense: bool = False
    data: bool = False
    rewind: bool = False
    config: bool = False
    plot: bool = False
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "RUNNING"


class TrialTracker:
    """The child run of one trial (or the run of one `lth-search lineage`)."""

    def __init__(self, cfg: ExperimentConfig, parent_run_id: str | None, trial_id: str, choices: dict[str, Any],
                 io: MlflowIO | None = None, role: str = "trial", tags: dict[str, str] | None = None,
                 identity: dict[str, str] | None = None) -> None:
        self.cfg, self.parent_run_id, self.trial_id, self.role = cfg, parent_run_id, trial_id, role
        self.artifact_uri: str | None = None
        """Where the run's artifacts go (from MLflow with the run): uploads need no look-up."""
        self.tags = dict(tags or {})
        """Extra tags of a new run (the search id and Optuna trial number, see `search_tags`)."""
        self.identity = dict(identity or {})
        """Tags that find this run again without a parent: a rerun of `lth-search lineage` completes its run."""
        self.choices = flatten(choices) if choices else {}
        """The choices as MLflow params (text that json.loads turns back into the value)."""
        self.io = io
        self.run_id: str | None = None
        self.state = RunState()
        self.logged: list[str] = []
        """What this tracker logged (dense, round_N, summary), for sync's report."""
        self.metric = metric_named(cfg.verdict_metric())
        """The metric the verdict judges: logged by its name (`val_loss`, ...) beside accuracy."""
        self.round_metrics = RoundMetrics(cfg, self.metric, trial_id, gains_live=self.details_live())
        self.pending = PendingLog()
        """What is logged but not yet sent (pending.py): sent every tracking.flush_s and at the end."""
        self._sent_at = time.monotonic()
        self.new_run = False
        """No attempt of this trial opened a run before (`start`): create it without looking for it."""

    @classmethod
    def start(cls, cfg: ExperimentConfig, parent_run_id: str | None, trial_id: str, choices: dict[str, Any],
              search_id: str | None = None, optuna_trial: int | None = None,
              first_attempt: bool = False) -> "TrialTracker":
        """The tracker of the trial's child run: the one tagged with this trial id if it exists, else a
        new one, opened when the trial first logs (after its dense stage is in its record).

        `first_attempt`: the store holds no record of this trial, so no attempt of it ever logged
        (a run is opened only after the record is saved: `TrialRun.on_dense`), and the run is
        created without asking MLflow for it (a search of the experiment's runs by tag, ~10 ms
        and growing with them, per trial).

        Without a parent run (MLflow was down when the search started) nothing is logged
        now; the search's finish or `lth-search sync` logs the trial from the store.
        """
        tags = search_tags(search_id, optuna_trial)
        if not cfg.tracking.enabled or parent_run_id is None:
            if cfg.tracking.enabled:
                log.warning("trial %s: the search has no MLflow run; `lth-search sync %s` logs it later", trial_id, cfg.name)
            return cls(cfg, parent_run_id, trial_id, choices, tags=tags)
        io = MlflowIO(cfg.tracking_uri(), sync_hint(cfg), shared=True)
        tracker = cls(cfg, parent_run_id, trial_id, choices, io, tags=tags)
        tracker.new_run = first_attempt
        return tracker

    # Opening ----------------------------------------------------------------------------------
    def ensure_run(self) -> bool:
        """Whether the run is open; tries to open it when an earlier attempt failed."""
        if self.io is None:
            return False
        if self.run_id is None:
            ok, run = self.io.call(f"open the MLflow run of trial {self.trial_id}", self._find_or_create)
            if not ok:
                return False
            self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
            self._queue_setup()
        return True

    def _find_or_create(self) -> Any:
        io = self.io
        experiment = io.experiment_id(self.cfg.experiment_name(), cached=self.parent_run_id is not None)
        found = {TRIAL_ID: self.trial_id, PARENT: self.parent_run_id} if self.parent_run_id is not None else None
        found = found or ({ROLE: self.role, **self.identity} if self.identity else None)
        if found is not None and not self.new_run:
            run = io.find_run(experiment, found)
            if run is not None:
                self._read_state(run)
                return run
        shape, classes = data_signature(self.cfg.data)
        tags = {
            ROLE: self.role, TRIAL_ID: self.trial_id, SEARCH_NAME: self.cfg.name,
            TOLERANCE: repr(self.cfg.search.tolerance), METRIC: self.metric.name, REWIND_STEP: str(self.cfg.prune.rewind_step),
            INPUT_SHAPE: json.dumps(list(shape)), NUM_CLASSES: str(classes), **self.identity,
            **source_tags(), **self.tags, "mlflow.note.content": run_description(self.cfg, self.role, self.choices),
        }
        if self.parent_run_id is not None:
            tags[PARENT] = self.parent_run_id
        name = " ".join([self.trial_id, *(f"{k}={v}" for k, v in self.choices.items())])[:200]
        return io.client.create_run(experiment, tags=tags, run_name=name)

    def _read_state(self, run: Any) -> None:
        io, run_id = self.io, run.info.run_id
        masks, weights = io.artifact_names(run_id, "masks"), io.artifact_names(run_id, "weights")
        self.state = RunState(
            rounds=set(metric_history(io.client, run_id, "val_accuracy")),
            masks={int(m.group(1)) for m in map(MASK_RE.search, masks) if m},
            trained={int(m.group(1)) for m in map(TRAINED_RE.search, weights) if m},
            dense="dense_val_accuracy" in run.data.metrics,
            data=bool(run.inputs and run.inputs.dataset_inputs),
            rewind=rewind_artifact(self.cfg.prune.rewind_step) in weights,
            config=CONFIG in io.artifact_names(run_id),
            plot=LINEAGE_PLOT in io.artifact_names(run_id, LINEAGE_PLOT.rsplit("/", 1)[0]),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            status=run.info.status,
        )

    def _queue_setup(self) -> None:
        """The choices as params and the config as config.json, with the run's next values and files."""
        missing = {k: v for k, v in self.choices.items() if k not in self.state.params}
        if missing:
            self.pending.params.update(missing)
            self.pending.add("params", "values", lambda: self.state.params.update(missing))
        if not self.state.config:
            self.pending.files[CONFIG] = json.dumps(self.cfg.model_dump(mode="json"), indent=2).encode()
            self.pending.add("config", "files", lambda: setattr(self.state, "config", True))

    def flush(self, force: bool = True) -> None:
        """Send what is queued (pending.py); unless `force`, only once tracking.flush_s passed since the
        last send. Never raises."""
        if self.run_id is None or self.pending.empty():
            return
        if force or time.monotonic() - self._sent_at >= self.cfg.tracking.flush_s:
            self.pending.send(self.io, self.run_id, f"trial {self.trial_id}", self.artifact_uri)
            self._sent_at = time.monotonic()

    # Logging ----------------------------------------------------------------------------------
    def needs_dense(self) -> bool:
        return not (self.state.dense and self.state.rewind and self.state.data)

    def needs_dense_stage(self) -> bool:
        """Whether logging the dense stage needs its stored entry (θk, the data fingerprint)."""
        return not (self.state.rewind and self.state.data)

    def needs_round(self, round_index: int) -> bool:
        return round_index not in self.state.rounds or self.needs_round_stage(round_index)

    def needs_round_stage(self, round_index: int) -> bool:
        """Whether logging the round needs its stored entry (mask, trained weights)."""
        return round_index not in self.state.masks or round_index not in self.state.trained

    def log_dense(self, result: LineageResult, dense_entry: StageEntry | None) -> None:
        """Dense accuracies (metrics at step 0), the data set and the rewind weights θk of this trial, once."""
        if not self.ensure_run():
            return
        pending = self.pending
        if not self.state.dense:
            dense = dense_metrics(result.dense, self.metric)
            pending.metrics += [(0, dense), (sparsity_step(0.0), sparsity_series(result.dense))]
            pending.add("the dense stage", "values", lambda: self._sent("dense", dense))
        step = self.cfg.prune.rewind_step
        if not self.state.rewind and dense_entry is not None:
            pending.files[rewind_artifact(step)] = dense_entry.weights_file(f"rewind_{step}")
            pending.add(f"θ{step}", "files", lambda: setattr(self.state, "rewind", True))
        if not self.state.data and dense_entry is not None and "data_fingerprint" in dense_entry.inputs:
            fingerprint = dense_entry.inputs["data_fingerprint"]
            pending.inputs = lambda: self._log_data(fingerprint)
            pending.add("the data set", "inputs", lambda: setattr(self.state, "data", True))
        self.flush(force=False)

    def _sent(self, item: str, metrics: dict[str, float]) -> None:
        """Record that `item` (dense, round_N, summary) reached the run with `metrics`."""
        if item == "dense":
            self.state.dense = True
        elif item.startswith("round_"):
            self.state.rounds.add(int(item.removeprefix("round_")))
        self.state.metrics.update(metrics)
        self.logged.append(item)

    def _log_data(self, fingerprint: str) -> None:
        from mlflow.exceptions import MlflowException

        entry = [data_input(self.cfg, fingerprint)]
        try:
            self.io.client.log_inputs(self.run_id, entry)
        except MlflowException:  # trials adding the same data set at once collide once; it exists now
            self.io.client.log_inputs(self.run_id, entry)

    def log_round(self, round_result: RoundResult, entry: StageEntry | None) -> None:
        """The round's metrics at step = round, its mask and its trained weights, each once."""
        if not self.ensure_run():
            return
        index, pending = round_result.round, self.pending
        if index not in self.state.rounds:
            pending.metrics += self.round_metrics.of(round_result, entry)
            pending.add(f"round {index}", "values", lambda: self._sent(f"round_{index}", {}))
        if index not in self.state.masks and entry is not None and "mask" in entry.masks:
            pending.files[mask_layers_artifact(index)] = mask_layers_csv(entry.masks["mask"])
            pending.files[mask_artifact(index)] = entry.mask_file("mask")
            pending.add(f"the round {index} mask", "files", lambda: self.state.masks.add(index))
        if index not in self.state.trained and entry is not None and "end" in entry.weights:
            pending.files[trained_artifact(index)] = entry.weights_file("end")
            pending.add(f"the round {index} weights", "files", lambda: self.state.trained.add(index))
        self.flush(force=False)

    def finish(self, result: LineageResult, status: TrialStatus = TrialStatus.FINISHED) -> None:
        """Summary metrics (those that changed), the accuracy-vs-sparsity plot; send what is queued; end the run."""
        if not self.ensure_run():
            return
        summary = {k: v for k, v in summary_metrics(result).items() if self.state.metrics.get(k) != v}
        if summary:
            self.pending.metrics.append((0, summary))
            self.pending.add("the summary", "values", lambda: self._sent("summary", summary))
        if (summary or self.state.status == "RUNNING") and self.details_live():
            self._queue_plot(result)
        if result.failed:
            self.pending.tags[FAILED] = result.failed[:500]
        tagged: list[bool] = []
        if not self.identity:  # its status and completeness go with its last values (pending.py)
            self.pending.tags[STATUS] = status.value
            self.pending.complete = True
            self.pending.add("the status", "values", lambda: tagged.append(True))
        self.flush()
        if self.identity and self.io.missed:
            return  # left RUNNING, not FINISHED with rounds missing: a rerun finds it by its identity and completes it
        run_status = "FAILED" if result.failed else TERMINAL.get(status, "FINISHED")
        ok, _ = self.io.call(f"end the run of trial {self.trial_id}",
                             lambda: self._end(status.value, run_status, tagged=bool(tagged)))
        if ok:
            self.state.status = run_status

    def _end(self, status: str, run_status: str, tagged: bool) -> None:
        """End the run; its status tags first, unless they went with its last values (`tagged`)."""
        from mlflow.entities import RunTag

        if not tagged:
            tags = [RunTag(STATUS, status)] + ([RunTag(COMPLETE, "1")] if not self.io.missed else [])
            self.io.client.log_batch(self.run_id, tags=tags)
        self.io.client.set_terminated(self.run_id, run_status)

    def details_live(self) -> bool:
        """Whether this run plots itself as it ends and times its rounds' inference gains as they end:
        a lone lineage, or a trial of a search whose trials do (`trials_detailed_live`)."""
        return self.role != "trial" or trials_detailed_live(self.cfg)

    def log_gains(self, result: LineageResult, entry_of: Callable[[str], StageEntry | None]) -> bool:
        """Time and log now the inference gains of every round of `result` that has its stage
        (`entry_of(key)`), at step = round: what a trial of a large search did not time as it went
        (`trials_detailed_live`). Whether they were sent; never raises."""
        if not self.ensure_run():
            return False
        for round_result in result.rounds:
            entry = entry_of(round_result.key) if round_result.failed is None else None  # no read for a failed one
            gains = self.round_metrics.inference_gains(round_result, entry)
            if gains:
                self.pending.metrics.append((round_result.round, gains))
        if self.pending.empty():
            return False
        sent: list[bool] = []
        self.pending.add("the inference gains", "values", lambda: sent.append(True))
        self.flush()
        return bool(sent)

    def plot(self, result: LineageResult) -> None:
        """Draw and upload the lineage plot (its judged metric against sparsity) now (never raises)."""
        self._queue_plot(result)
        self.flush()

    def _queue_plot(self, result: LineageResult) -> None:
        rounds = [vars(r) for r in result.rounds]
        title = f"{self.cfg.name} · {self.trial_id}  " + " ".join(f"{k}={v}" for k, v in self.choices.items())
        try:
            png = lineage_plot(rounds, self.metric.val(result.dense), self.metric.test(result.dense),
                               result.tolerance, title[:110], result.best.round, self.metric)
        except Exception as error:  # noqa: BLE001 - a plot never costs a lineage
            log.warning("trial %s: plotting failed: %s", self.trial_id, error)
            return
        self.pending.files[LINEAGE_PLOT] = png
        self.pending.add("the plot", "files", lambda: setattr(self.state, "plot", True))
