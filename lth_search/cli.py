"""The `lth-search` command line: parse, call the API, print.

`main` is the one place where any failure becomes one line on stderr and an exit code,
never a traceback: 2 for input the user can correct (`LthError`, argparse usage), 1 for
a runtime failure (a full or read-only disk, a server away, a bug: `RuntimeFailure`,
`OSError`, anything else), 130 for an interrupt, where SIGTERM counts as SIGINT (a
batch system's kill is a Ctrl-C). `LTH_SEARCH_DEBUG=1` shows the traceback of an
unexpected error instead. Ray and MLflow are imported only by the commands that need
them, so `lineage` starts fast and `best`/`tickets` need neither Ray nor the store.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from lth_search.config.names import check_location, check_name
from lth_search.config.schema import default_output_dir
from lth_search.errors import EXIT_RUNTIME, EXIT_USAGE, LthError

EXIT_USER_ERROR = EXIT_USAGE
EXIT_INTERRUPTED = 130
MESSAGE_MAX = 2000


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a dotted config key with a YAML value, e.g. --set prune.rate=0.3 (repeatable)",
    )


def _add_tracking_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", help="MLflow experiment (default: the only / latest search)")
    parser.add_argument(
        "--tracking-uri",
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {default_output_dir()}/mlflow.db)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lth-search", description="Distributed hyperparameter search for lottery tickets (IMP lineages)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a search (local Ray by default)")
    _add_config_args(run)
    run.add_argument("--address", help="join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT")

    resume = commands.add_parser("resume", help="continue an interrupted search")
    resume.add_argument("name", help="the search's config name")
    resume.add_argument("--output-dir", help=f"output_dir of the search (default {default_output_dir()})")
    resume.add_argument("--address", help="join a Ray cluster instead of starting a local one")

    lineage = commands.add_parser("lineage", help="run one IMP lineage without Ray")
    _add_config_args(lineage)
    lineage.add_argument("--json", action="store_true", help="print one JSON object at the end")
    lineage.add_argument("--no-store", action="store_true", help="keep stages in memory only")
    lineage.add_argument("--no-track", action="store_true", help="do not log an MLflow run")

    best = commands.add_parser("best", help="the best ticket of a search")
    _add_tracking_args(best)
    criterion = best.add_mutually_exclusive_group()
    criterion.add_argument("--max-drop", type=float, help="sparsest ticket within this val accuracy drop of dense")
    criterion.add_argument("--min-sparsity", type=float, help="best val accuracy at or above this sparsity")
    best.add_argument("--out", help="write the ticket (mask, weights, config) to this folder")

    tickets = commands.add_parser("tickets", help="every ticket (trial-round) of a search")
    _add_tracking_args(tickets)

    sync = commands.add_parser("sync", help="log to MLflow what the store has and MLflow lacks")
    sync.add_argument("name", help="the search's config name")
    sync.add_argument("--output-dir", help=f"output_dir of the search (default {default_output_dir()})")
    sync.add_argument("--tracking-uri", help="MLflow tracking URI (default: the search config's)")
    return parser


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _round_line(metrics: dict[str, Any], total: int) -> str:
    tag = "  (reused)" if metrics["reused"] else ""
    return (
        f"round {metrics['round']}/{total}  sparsity {100 * metrics['sparsity']:6.2f}%  "
        f"val {100 * metrics['val_accuracy']:5.2f}%  test {100 * metrics['test_accuracy']:5.2f}%  "
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
    else:
        best = result.best
        print(
            f"matching sparsity {100 * best.sparsity:.2f}% (round {best.round}, val {100 * best.val_accuracy:.2f}% "
            f"vs dense {100 * result.dense.val_accuracy:.2f}%); steps executed {result.steps_executed}, "
            f"reused {result.steps_reused}"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lth_search.api import load_config, run_search

    cfg = load_config(args.config, args.overrides)
    return _search_exit(run_search(cfg, address=args.address, progress=_print_progress))


def _check_search_args(args: argparse.Namespace) -> None:
    check_name(args.name, "search name")
    if args.output_dir is not None:
        check_location(args.output_dir, "--output-dir")


def cmd_resume(args: argparse.Namespace) -> int:
    from lth_search.api import resume_search

    _check_search_args(args)
    return _search_exit(resume_search(args.name, output_dir=args.output_dir, address=args.address,
                                      progress=_print_progress))


def _search_exit(summary: dict[str, Any]) -> int:
    """0 for a search that ended; 130 (as for Ctrl-C) for one interrupted before its end."""
    return EXIT_INTERRUPTED if summary.get("status") == "interrupted" else 0


def cmd_best(args: argparse.Namespace) -> int:
    from lth_search.api import best_ticket
    from lth_search.tickets import describe_ticket

    if args.out is not None:
        check_location(args.out, "--out")
    ticket = best_ticket(
        experiment=args.experiment, max_accuracy_drop=args.max_drop, min_sparsity=args.min_sparsity,
        tracking_uri=args.tracking_uri,
    )
    saved = ticket.save(args.out) if args.out else None
    print(json.dumps(ticket.summary()) if args.json else describe_ticket(ticket))
    if saved is not None and not args.json:
        print(f"  ticket files (mask.parquet, rewind.safetensors, config.json, ticket.json) in {saved}")
    return 0


def cmd_tickets(args: argparse.Namespace) -> int:
    from lth_search.api import list_tickets
    from lth_search.tickets import format_tickets

    table = list_tickets(experiment=args.experiment, tracking_uri=args.tracking_uri)
    print(json.dumps(table) if args.json else format_tickets(table))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from lth_search.api import sync_search

    _check_search_args(args)
    sync_search(args.name, output_dir=args.output_dir, tracking_uri=args.tracking_uri, progress=_print_progress)
    return 0


COMMANDS = {
    "run": cmd_run, "resume": cmd_resume, "lineage": cmd_lineage, "best": cmd_best,
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
