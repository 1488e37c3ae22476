"""The ``medtransfer`` command: one sub-command per stage, plus ``run`` for the whole flow.

``serve-deployments`` and ``deploy`` schedule it (see :mod:`flows.deployments`).

Every sub-command reads ``params.yaml`` (or ``--params``) and applies ``-S key=value``
overrides, spelled as for ``dvc exp run -S``. Progress goes to stderr (log lines, and bars unless
``--quiet``); stdout gets a short human summary, or the full JSON with ``--json``. A
:class:`~tasks.errors.MedtransferError`, or an ``OSError`` (the disk or share as it is: a
file where a folder belongs, a full disk), is printed as one line naming the stage, the path and
what to do, and exits with status 2 (``monitor`` exits 1 when it found drift); nothing else is caught, so a bug still shows its traceback. Ctrl-C and SIGTERM (which the train stage
turns into an exception, to record its run as ``KILLED``) end with one line and the shell's
status for the signal: 130 and 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from flows.summary import summary_lines
from tasks.config import Params, load_params
from tasks.errors import MedtransferError, stage_io_error
from tasks.project_lock import project_lock
from tasks.signals import EXIT_SIGINT, EXIT_SIGTERM, Terminated
from tasks.stages import table
from tasks.stages.table import Stage
from tasks.tracking_store import check_tracking_store


def stage_handler(stage: Stage) -> Callable[[Params, argparse.Namespace], dict]:
    """The handler of ``stage``'s sub-command: its entry function, called with the options its
    row declares; a result with ``to_report`` (the ingest result) is returned as that report."""

    def handler(params: Params, args: argparse.Namespace) -> dict:
        module, function = stage.entry.split(":")
        # Imported when the command runs: the stage modules load torch, MLflow and MONAI.
        entry = getattr(importlib.import_module(module), function)
        options = {"progress": not args.quiet, "resume": getattr(args, "resume", False)}
        result = entry(params, **{name: options[name] for name in stage.options})
        return result.to_report() if hasattr(result, "to_report") else result

    return handler


def _run(params: Params, args: argparse.Namespace) -> dict:
    from flows.pipeline import run_pipeline  # imports Prefect, which sets up its logging

    with bars_above_prefect_lines():
        return run_pipeline(args.params, list(args.set), progress=not args.quiet)


@contextlib.contextmanager
def bars_above_prefect_lines() -> Iterator[None]:
    """Prefect's console lines (its handler on the root logger: task-run states, the flow's
    log) written through ``tqdm.write`` while inside, as the stages' own lines are, so that
    they print above an open progress bar instead of through it; Prefect's handler is back
    on exit."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def _serve_deployments(params: Params, args: argparse.Namespace) -> dict:
    from flows.deployments import serve_deployments

    serve_deployments(args.params, list(args.set))  # blocks until Ctrl-C or SIGTERM
    return {"served": "stopped"}


def _deploy(params: Params, args: argparse.Namespace) -> dict:
    from flows.deployments import deploy_deployments

    ids = deploy_deployments(args.work_pool, args.params, list(args.set))
    return {"work_pool": args.work_pool, "deployment_ids": ids}


# The stages' sub-commands come from the stage table; these commands run the flow or schedule it.
OTHER_COMMANDS: dict[str, tuple[Callable[[Params, argparse.Namespace], dict], str]] = {
    "run": (_run, "run the whole Prefect flow"),
    "serve-deployments": (
        _serve_deployments,
        "serve the scheduled-retrain and watch-folder deployments (orchestration in params.yaml)",
    ),
    "deploy": (_deploy, "register the same deployments with a Prefect work pool"),
}
SUBCOMMANDS: dict[str, tuple[Callable[[Params, argparse.Namespace], dict], str]] = {
    **{stage.name: (stage_handler(stage), stage.help) for stage in table.STAGES},
    **OTHER_COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; sub-commands share ``--params``, ``-S`` and ``--quiet``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", default="params.yaml", help="parameter file (default: params.yaml)"
    )
    common.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. -S data.image_size=160 (repeatable)",
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--json", action="store_true", help="print the full result as JSON, not the summary"
    )
    # the module docstring's first paragraph, without its reStructuredText literal markers
    description = __doc__.split("\n\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="medtransfer", description=description)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        command = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name in table.BY_NAME and "resume" in table.BY_NAME[name].options:
            command.add_argument(
                "--resume",
                nargs="?",
                const="strict",
                default=False,
                choices=["strict", "force"],
                metavar="force",
                help="continue the interrupted training of this configuration (its checkpoint "
                "and its MLflow run); with changed parameters, data or code it is an error "
                "naming what changed, unless --resume=force, which continues the latest "
                "checkpoint with the new values",
            )
        if name == "deploy":
            command.add_argument(
                "--work-pool",
                required=True,
                help="an existing work pool (prefect work-pool create --type process NAME)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medtransfer`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler, _ = SUBCOMMANDS[args.command]
    configure_logging()
    try:
        params = load_params(args.params, args.set)
        if args.command in USES_TRACKING:
            check_tracking_store(
                os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
            )
        summary = _handle(handler, params, args)
    except MedtransferError as err:
        print(f"medtransfer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk or share as it is, not a bug: one line, no traceback
        print(
            f"medtransfer {args.command}: error: {stage_io_error(args.command, err)}",
            file=sys.stderr,
        )
        return 2
    except (KeyboardInterrupt, Terminated) as err:
        stopped = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
        print(f"medtransfer {args.command}: {stopped}", file=sys.stderr)
        return EXIT_SIGINT if isinstance(err, KeyboardInterrupt) else EXIT_SIGTERM
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(human_summary(args.command, summary, params))
    # monitor's status says whether it found drift (1), as diff's says whether files differ.
    return EXIT_DRIFT if args.command == "monitor" and summary.get("drift") else 0


EXIT_DRIFT = 1


# Commands that log to or read from MLflow: their tracking store is checked before any stage
# runs, so `run` refuses an unreachable server in seconds instead of after ingesting.
USES_TRACKING = frozenset({"train", "evaluate", "robustness", "register", "package", "run"})

# Commands that write the project's outputs (dataset, models, reports, registry, Bento) hold
# the project lock: the stages whose row says so, and the whole flow; advise, monitor and the
# deployment commands only read them or run elsewhere.
WRITES_OUTPUTS = frozenset({stage.name for stage in table.STAGES if stage.locks} | {"run"})


def _handle(
    handler: Callable[[Params, argparse.Namespace], dict], params: Params, args: argparse.Namespace
) -> dict:
    """Run ``handler``, under the project lock when the command writes outputs."""
    from tasks.training.recorders import quiet_bars

    with quiet_bars() if args.quiet else contextlib.nullcontext():
        if args.command not in WRITES_OUTPUTS:
            return handler(params, args)
        with project_lock(params.data.processed_dir, args.command):
            return handler(params, args)


def configure_logging() -> None:
    """The stages' log lines (loggers under ``tasks`` and ``medtransfer``) on stderr, above any
    progress bar; the Prefect flow copies the same loggers into its run logs."""
    from tasks.training.recorders import log_to_terminal

    for name in ("tasks", "medtransfer"):
        log_to_terminal(name)


def human_summary(command: str, result: dict, params: Params) -> str:
    """The few lines a person reads after ``command``: the whole run's summary for ``run``,
    the stage's own part otherwise."""
    if command == "advise":
        return "\n".join(result["lines"])
    if command == "monitor":
        from tasks.monitoring.drift import summary_lines as monitor_lines

        return "\n".join(monitor_lines(result))
    summary = result if command == "run" else {command: result}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    lines = summary_lines(summary, uri) or [json.dumps(result, default=str)[:500]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
