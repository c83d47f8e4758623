"""The `lth-search` command line: parse, call the API, print.

Errors a user can cause (`LthError`) print as one line on stderr and exit with code 2,
without a traceback. Ray and MLflow are imported only by the commands that need them,
so `lineage` starts fast and `best`/`tickets` need neither Ray nor the store.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from lth_search.config.schema import default_output_dir
from lth_search.errors import LthError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


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


def cmd_resume(args: argparse.Namespace) -> int:
    from lth_search.api import resume_search

    return _search_exit(resume_search(args.name, output_dir=args.output_dir, address=args.address,
                                      progress=_print_progress))


def _search_exit(summary: dict[str, Any]) -> int:
    """0 for a search that ended; 130 (as for Ctrl-C) for one interrupted before its end."""
    return EXIT_INTERRUPTED if summary.get("status") == "interrupted" else 0


def cmd_best(args: argparse.Namespace) -> int:
    from lth_search.api import best_ticket
    from lth_search.tickets import FILES, describe_ticket

    ticket = best_ticket(
        experiment=args.experiment, max_accuracy_drop=args.max_drop, min_sparsity=args.min_sparsity,
        tracking_uri=args.tracking_uri,
    )
    saved = ticket.save(args.out) if args.out else None
    print(json.dumps(ticket.summary()) if args.json else describe_ticket(ticket))
    if saved is not None and not args.json:
        print(f"  ticket files ({', '.join(p.name for p in sorted(saved.iterdir()) if p.name in FILES)}) in {saved}")
    return 0


def cmd_tickets(args: argparse.Namespace) -> int:
    from lth_search.api import list_tickets
    from lth_search.tickets import format_tickets

    table = list_tickets(experiment=args.experiment, tracking_uri=args.tracking_uri)
    print(json.dumps(table) if args.json else format_tickets(table))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from lth_search.api import sync_search

    sync_search(args.name, output_dir=args.output_dir, tracking_uri=args.tracking_uri, progress=_print_progress)
    return 0


COMMANDS = {
    "run": cmd_run, "resume": cmd_resume, "lineage": cmd_lineage, "best": cmd_best,
    "tickets": cmd_tickets, "sync": cmd_sync,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LthError as error:
        print(f"lth-search: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lth-search: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
