"""The `lth-search` command line: parse, call the API, print.

`main` is the one place where any failure becomes one line on stderr and an exit code,
never a traceback: 2 for input the user can correct (`LthError`, argparse usage), 1 for
a runtime failure (a full or read-only disk, a server away, a bug: `RuntimeFailure`,
`OSError`, anything else), 130 for an interrupt, where SIGTERM counts as SIGINT (a
batch system's kill is a Ctrl-C). `LTH_SEARCH_DEBUG=1` shows the traceback of an
unexpected error instead. Ray and MLflow are imported only by the commands that need
them, so `lineage` starts fast and `best`/`tickets` need neither Ray nor the store.
Human text goes to stderr, `--json` results alone to stdout. Defaults come from the schema.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator, Sequence

from lth_search.config import KINDS, default_output_dir
from lth_search.config.names import check_location, check_name
from lth_search.errors import EXIT_RUNTIME, EXIT_USAGE, ConfigError, LthError

EXIT_USER_ERROR = EXIT_USAGE
EXIT_INTERRUPTED = 130
MESSAGE_MAX = 2000


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a dotted config key with a YAML value, e.g. --set prune.rate=0.3 (repeatable)",
    )


def _add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout")


def _add_tracking_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the latest search's)"
    )
    parser.add_argument(
        "--search-run-id", help="the MLflow run id of one search of the experiment (default: the latest)"
    )
    parser.add_argument(
        "--tracking-uri",
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {default_output_dir()}/mlflow.db)",
    )
    _add_json(parser)


def _add_search_location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the search's config name")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--store-uri", help="the search's store.uri: its state lives beside the store (default: OUTPUT_DIR/store)"
    )
    where.add_argument(
        "--output-dir", help=f"the search's output_dir, when it used the default store (default {default_output_dir()})"
    )


def _add_console_args(parser: argparse.ArgumentParser) -> None:
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="also show Ray's trial tables and MLflow/Optuna logs (-vv: Ray's most verbose tables)",
    )
    loud.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument(
        "--address", help="join the Ray cluster at HOST:PORT or 'auto' (default: $RAY_ADDRESS, else a local Ray)"
    )
    _add_json(parser, "the search summary")


def _version() -> str:
    try:
        return version("lth-search")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lth-search", description="Distributed hyperparameter search for lottery tickets (IMP lineages).",
        epilog="On a Ray cluster: ray job submit --address http://HEAD:8265 -- lth-search run CONFIG ...",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a search (local Ray, or the cluster of ray job submit / --address)")
    _add_config_args(run)
    _add_console_args(run)

    resume = commands.add_parser("resume", help="continue an interrupted search")
    _add_search_location(resume)
    _add_console_args(resume)

    lineage = commands.add_parser("lineage", help="run one IMP lineage without Ray")
    _add_config_args(lineage)
    lineage.add_argument("--json", action="store_true", help="print one JSON object at the end")
    lineage.add_argument("--no-store", action="store_true", help="keep stages in memory only")
    lineage.add_argument("--no-track", action="store_true", help="do not log an MLflow run")

    compare = commands.add_parser("compare", help="lineage kinds side by side at the IMP lineage's sparsities")
    _add_config_args(compare)
    compare.add_argument("--kinds", default=",".join(KINDS),
                         help=f"comma-separated kinds (default all: {','.join(KINDS)})")
    compare.add_argument("--seeds", help="comma-separated seeds (default: the config's seed)")
    compare.add_argument("--structures", help="comma-separated prune.structure values (e.g. channel,2:4): IMP pruned "
                         "with each, tabled against unstructured IMP at equal parameter counts")
    compare.add_argument("--out", help="folder for table.txt, the plot, compare.json/csv "
                         "(default <output_dir>/compare/<name>)")
    compare.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    compare.add_argument("--no-store", action="store_true", help="keep stages in memory only")
    compare.add_argument("--no-track", action="store_true", help="do not log an MLflow run")

    best = commands.add_parser("best", help="the best ticket of a search")
    _add_tracking_args(best)
    criterion = best.add_mutually_exclusive_group()
    criterion.add_argument(
        "--max-drop", type=float, metavar="FRACTION",
        help="sparsest ticket whose val accuracy is at most this fraction below dense (0.01 = 1 point); for a "
        "search judged on loss or perplexity, whose val loss is at most this many nats above dense",
    )
    criterion.add_argument(
        "--min-sparsity", type=float, metavar="FRACTION",
        help="best val accuracy (or lowest val loss or perplexity, by the search's metric) among tickets at or "
        "above this sparsity (a fraction: 0.9 = 90%% pruned)",
    )
    best.add_argument("--out", help="write the ticket (mask, weights, config) to this folder")
    best.add_argument("--format", choices=("dense", "csr", "bsr", "structured"),
                      help="with --out: also write the trained network in this form (CSR/BSR sparse layers, or "
                           "structured: a smaller dense network) with load_ticket.py, a loader needing torch alone")

    tickets = commands.add_parser("tickets", help="every ticket (trial-round) of a search")
    _add_tracking_args(tickets)

    sync = commands.add_parser("sync", help="log to MLflow what the store has and MLflow lacks")
    _add_search_location(sync)
    sync.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the search logged to)")
    _add_json(sync, "what was logged")
    return parser


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _round_line(metrics: dict[str, Any], total: int) -> str:
    tag = "  (reused)" if metrics["reused"] else ""
    named = [key for key in metrics if key.startswith(("val_", "test_")) and key not in ("val_accuracy", "test_accuracy")
             and key != "val_margin"]
    judged = "  ".join(f"{key} {metrics[key]:.4g}" for key in named) if named else (
        f"val {100 * metrics['val_accuracy']:5.2f}%  test {100 * metrics['test_accuracy']:5.2f}%")
    return (
        f"round {metrics['round']}/{total}  sparsity {100 * metrics['sparsity']:6.2f}%  {judged}  "
        f"loss {metrics['train_loss']:.3f}  {metrics['train_steps_per_s']:7.0f} steps/s{tag}"
    )


def cmd_lineage(args: argparse.Namespace) -> int:
    from lth_search.api import run_lineage_command

    result = run_lineage_command(
        args.config, args.overrides, use_store=not args.no_store, track=not args.no_track,
        progress=_print_progress, round_line=_round_line,
    )
    if args.json:
        print(json.dumps(result.to_json()))
    elif result.failed:
        print(f"no ticket: the {result.failed}")
    else:
        best = result.best
        named = result.metric_values(result.matching_stage)
        dense = result.metric_values(result.dense)
        judged = ", ".join(f"{key} {value:.4g} vs dense {dense[key]:.4g}" for key, value in named.items()
                           if key.startswith("val_")) if named else (
            f"val {100 * best.val_accuracy:.2f}% vs dense {100 * result.dense.val_accuracy:.2f}%")
        print(
            f"matching sparsity {100 * best.sparsity:.2f}% (round {best.round}, {judged}); steps executed "
            f"{result.steps_executed}, reused {result.steps_reused}"
        )
    return 1 if result.failed else 0


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from lth_search.api import compare

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    result = compare(
        args.config, kinds, _int_list(args.seeds, "--seeds"), args.overrides, out=args.out,
        use_store=not args.no_store, track=not args.no_track, progress=_print_progress,
        structures=[s.strip() for s in (args.structures or "").split(",") if s.strip()],
    )
    print(json.dumps(result.to_json()) if args.json else result.table())
    return 0


def _verbosity(args: argparse.Namespace) -> int:
    return -1 if args.quiet else args.verbose


@contextlib.contextmanager
def _human_text_on_stderr() -> Iterator[None]:
    """Anything printed while a search runs (Ray's tables with -v, forwarded worker output) goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def cmd_run(args: argparse.Namespace) -> int:
    from lth_search.api import load_config, run_search

    cfg = load_config(args.config, args.overrides)
    with _human_text_on_stderr():
        summary = run_search(cfg, address=args.address, progress=_print_progress, verbosity=_verbosity(args))
    return _search_exit(summary, args.json)


def _check_search_args(args: argparse.Namespace) -> None:
    check_name(args.name, "search name")
    if args.output_dir is not None:
        check_location(args.output_dir, "--output-dir")


def cmd_resume(args: argparse.Namespace) -> int:
    from lth_search.api import resume_search

    _check_search_args(args)
    with _human_text_on_stderr():
        summary = resume_search(
            args.name, output_dir=args.output_dir, store_uri=args.store_uri, address=args.address,
            progress=_print_progress, verbosity=_verbosity(args),
        )
    return _search_exit(summary, args.json)


def _search_exit(summary: dict[str, Any], as_json: bool) -> int:
    """0 for a search that ended; 130 (as for Ctrl-C) for one interrupted before its end."""
    if as_json:
        print(json.dumps(summary))
    return EXIT_INTERRUPTED if summary.get("status") == "interrupted" else 0


def cmd_best(args: argparse.Namespace) -> int:
    from lth_search.api import best_ticket
    from lth_search.ticket_forms import export_ticket
    from lth_search.ticket_text import describe_ticket
    from lth_search.tickets import FILES

    if args.out is not None:
        check_location(args.out, "--out")
    elif args.format is not None:
        raise ConfigError("--format needs --out DIR: the folder to write the ticket in that form")
    ticket = best_ticket(
        experiment=args.experiment, search_run_id=args.search_run_id, max_accuracy_drop=args.max_drop,
        min_sparsity=args.min_sparsity, tracking_uri=args.tracking_uri,
    )
    saved = export_ticket(ticket, args.out, args.format) if args.out else None
    print(json.dumps(ticket.summary()) if args.json else describe_ticket(ticket))
    if saved is not None and not args.json:
        print(f"  ticket files ({', '.join(p.name for p in sorted(saved.iterdir()) if p.name in FILES)}) in {saved}")
        if args.format is not None:
            print(f"  {args.format} form: model.json + weights.safetensors; load with torch alone: "
                  f"cd {saved} && python -c 'import load_ticket; net = load_ticket.load()'")
    return 0


def cmd_tickets(args: argparse.Namespace) -> int:
    from lth_search.api import list_tickets
    from lth_search.ticket_text import format_tickets

    table = list_tickets(experiment=args.experiment, tracking_uri=args.tracking_uri, search_run_id=args.search_run_id)
    print(json.dumps(table) if args.json else format_tickets(table))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from lth_search.api import sync_search

    _check_search_args(args)
    counts = sync_search(args.name, output_dir=args.output_dir, store_uri=args.store_uri,
                         tracking_uri=args.tracking_uri, progress=_print_progress)
    if args.json:
        print(json.dumps(counts))
    return 0


COMMANDS = {
    "run": cmd_run, "resume": cmd_resume, "lineage": cmd_lineage, "compare": cmd_compare, "best": cmd_best,
    "tickets": cmd_tickets, "sync": cmd_sync,
}


def one_line(text: str, limit: int = MESSAGE_MAX) -> str:
    """`text` as one line of at most `limit` characters (messages may quote user input)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failure_message(error: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) of any exception that reached the command line."""
    if isinstance(error, LthError):
        return str(error), error.exit_code
    if isinstance(error, MemoryError):
        return "out of memory (a model or batch too large for this machine? lower model.widths / train.batch_size)", EXIT_RUNTIME
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        reason = error.strerror or str(error) or type(error).__name__
        return f"{reason}{where}; what was stored before stays stored, rerun the command once this is fixed", EXIT_RUNTIME
    text = str(error).strip().splitlines()
    detail = f"{type(error).__name__}: {text[0] if text else ''}"
    return f"internal error ({detail}); rerun with LTH_SEARCH_DEBUG=1 for the traceback and report it", EXIT_RUNTIME


def _on_sigterm(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)  # e.g. Ray Tune's: stop the trials, save, return
        return
    raise KeyboardInterrupt  # also when SIGINT is ignored (a background job): SIGTERM must still stop us


@contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM runs whatever SIGINT runs (KeyboardInterrupt, or Ray Tune's graceful stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_as_sigint():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lth-search: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place any failure becomes one line
        if os.environ.get("LTH_SEARCH_DEBUG") and not isinstance(error, LthError):
            raise
        message, code = failure_message(error)
        print(f"lth-search: error: {one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
