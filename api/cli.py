"""`shotcache`: the service's own commands (serve, eval, build-offline-model, from app.cli), the benchmark
harness (`bench`, the top-level `benchmarks` package, extra `bench`) and the client commands against a running
service (`task create|list|show|delete`, `classify`; api/client.py, extra `client`).

The optional parts are imported when their command runs, so `shotcache serve` needs neither httpx nor the
benchmarks; a missing extra is named in the error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from app.cli import build_parser as build_service_parser
from app.cli import cmd_serve, configure_logging, setting_overrides, settings_from_args
from app.service import METHODS

from .schemas import BuildOut, ClassifyOut, TaskList, TaskOut

if TYPE_CHECKING:
    from .client import Progress, ShotcacheClient

ClientCommand = Callable[[argparse.Namespace, "ShotcacheClient"], int]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Progress | None]:
    """A tqdm bar per stage (upload in bytes, build in shots) on stderr; none when disabled."""
    if not enabled:
        yield None
        return
    bars: dict[str, Any] = {}
    units = {"upload": ("uploading", "B", True), "build": ("encoding shots", "shot", False)}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            label, unit, scale = units.get(stage, (stage, "it", False))
            bar = bars[stage] = tqdm(total=total, desc=label, unit=unit, unit_scale=scale, file=sys.stderr, leave=True)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        for bar in bars.values():
            bar.close()


def _with_client(func: ClientCommand) -> Callable[[argparse.Namespace], int]:
    """A client command: runs `func` with a client of the service; a service error is printed (exit 1)."""

    def run(args: argparse.Namespace) -> int:
        try:
            from .client import DEFAULT_URL, ShotcacheClient, ShotcacheError
        except ImportError as error:
            command = " ".join(c for c in (args.command, getattr(args, "task_command", None)) if c)
            print(
                f"`shotcache {command}` needs the HTTP client, extra `client` ({error}): "
                "pip install 'shotcache[client]'",
                file=sys.stderr,
            )
            return 2
        url = args.url or os.environ.get("SHOTCACHE_URL") or DEFAULT_URL
        try:
            with ShotcacheClient(url, api_key=args.api_key or None) as client:
                return func(args, client)
        except ShotcacheError as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return 1

    return run


def cmd_bench(args: argparse.Namespace) -> int:
    """`bench`: the benchmark harness (the top-level `benchmarks` package; extra `bench` for its HTTP load)."""
    try:
        import httpx  # noqa: F401  (the served section's load generator: checked here, not after minutes of runs)

        from benchmarks.runner import run_benchmarks
    except ImportError as error:
        print(
            f"`shotcache bench` needs the benchmark harness and its extra `bench` ({error}): "
            "pip install 'shotcache[bench]' from a checkout (the `benchmarks` package sits beside app/)",
            file=sys.stderr,
        )
        return 2
    return run_benchmarks(args)


def _members(task: TaskOut) -> str:
    """' of a + b' for an ensemble (the methods whose answers it averages), else ''."""
    fit = task.methods.get(task.method)
    return f" of {' + '.join(fit.members)}" if fit is not None and fit.members else ""


def _task_summary(task: TaskOut) -> str:
    hyper = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in task.hyperparams.items())
    lines = [
        f"task {task.id}" + (f" ({task.name})" if task.name else "") + f", version {task.version}",
        f"model {task.model} ({task.backend})",
        f"method {task.method}{_members(task)} ({hyper or 'no hyper-parameters'})",
        f"leave-one-out accuracy {_percent(task.loo_accuracy)}",
    ]
    per_class = {c.name: c for c in task.loo.classes} if task.loo else {}
    rows = []
    for c in task.classes:
        loo = per_class.get(c.name)
        rows.append([c.name, str(c.shots), f"{_percent(loo.accuracy)} ({loo.correct}/{loo.scored})" if loo else "-"])
    lines += ["", table(["class", "shots", "leave-one-out"], rows)]
    if task.selection is not None and task.selection.ranking:
        fit = task.methods.get(task.method)
        picked = set(fit.members) if fit is not None and fit.members else {task.method}
        ranking = [
            [r.method + (" *" if r.method in picked else ""), _percent(r.fold_accuracy), f"{r.fold_nll:.3f}"]
            for r in task.selection.ranking
        ]
        lines += [
            "",
            f"auto ({task.selection.rule}): every method refitted on {task.selection.folds} shared shot folds, "
            f"{task.selection.scored_shots} held-out shots, best first (* = serves)",
            table(["method", "held-out accuracy", "cross-entropy"], ranking),
        ]
    return "\n".join(lines)


def cmd_task_create(args: argparse.Namespace, client: ShotcacheClient) -> int:
    with progress_bars(not args.quiet) as progress:
        result = client.create_task(
            folder=args.from_folder,
            name=args.name,
            method=args.method,
            views=args.views,
            wait=not args.no_wait,
            progress=progress,
        )
    if args.json:
        print(result.model_dump_json(indent=2))
    elif isinstance(result, BuildOut):
        print(f"task {result.id} building in the background ({result.done}/{result.total} shots)")
    else:
        print(_task_summary(result))
    return 0


def _list_rows(listing: TaskList) -> list[list[str]]:
    rows = []
    for t in listing.tasks:
        shots = str(sum(c.shots for c in t.classes))
        rows.append(
            [t.id, t.name or "", str(len(t.classes)), shots, t.method, _percent(t.loo_accuracy), str(t.version)]
        )
    for b in listing.building:
        state = f"{b.status} {b.done}/{b.total}" + (f": {b.error.message}" if b.error else "")
        rows.append([b.id, state, "", "", "", "", ""])
    return rows


def cmd_task_list(args: argparse.Namespace, client: ShotcacheClient) -> int:
    listing = client.list_tasks()
    if args.json:
        print(listing.model_dump_json(indent=2))
    elif not listing.tasks and not listing.building:
        print("no tasks")
    else:
        print(table(["id", "name", "classes", "shots", "method", "loo", "version"], _list_rows(listing)))
    return 0


def cmd_task_show(args: argparse.Namespace, client: ShotcacheClient) -> int:
    task = client.get_task(args.task)
    if args.json:
        print(task.model_dump_json(indent=2))
    elif isinstance(task, BuildOut):
        print(f"task {task.id} building: {task.done}/{task.total} shots encoded")
    else:
        print(_task_summary(task))
    return 0


def cmd_task_update(args: argparse.Namespace, client: ShotcacheClient) -> int:
    from .client import UNSET, Unset  # the client's module imports httpx: not at serve time

    name: str | Unset | None = None if args.clear_name else UNSET if args.name is None else args.name
    task = client.update_task(args.task, method=args.method, name=name)
    print(task.model_dump_json(indent=2) if args.json else _task_summary(task))
    return 0


def cmd_task_delete(args: argparse.Namespace, client: ShotcacheClient) -> int:
    for task_id in args.tasks:
        client.delete_task(task_id)
        print(f"deleted {task_id}")
    return 0


def _classify_rows(answer: ClassifyOut) -> list[list[str]]:
    rows = []
    for r in answer.results:
        best = r.top_k[0].probability if r.top_k else None
        others = ", ".join(f"{p.label} {_percent(p.probability)}" for p in r.top_k[1:])
        label = r.label if r.label is not None else f"(abstained: {r.reason})"
        rows.append([r.filename or "", label, _percent(best), others])
    return rows


def cmd_classify(args: argparse.Namespace, client: ShotcacheClient) -> int:
    with progress_bars(not args.quiet and not args.json) as progress:
        answer = client.classify(
            args.task,
            list(args.images),
            top_k=args.top_k,
            method=args.method,
            abstain=args.abstain,
            evidence=args.evidence,
            progress=progress,
        )
    if args.json:
        print(answer.model_dump_json(indent=2))
    else:
        print(table(["image", "label", "probability", "next"], _classify_rows(answer)))
    return 0


def _connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the service (default: SHOTCACHE_URL, else http://127.0.0.1:8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("SHOTCACHE_API_KEY"),
        help="API key, if the service needs one (SHOTCACHE_API_KEY)",
    )
    p.add_argument("--json", action="store_true", help="print the service's JSON answer")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("app.cli's parser has no sub-commands")


def cmd_serve_any_engine(args: argparse.Namespace) -> int:
    """`serve`: the single-process engine from app.cli, or `--engine ray` (api.ray_serve, extra `ray`)."""
    if args.engine != "ray":
        return cmd_serve(args)
    try:
        from .ray_serve import serve_with_ray
    except ImportError as error:
        print(f"--engine ray needs Ray Serve ({error}): pip install 'shotcache[ray]'", file=sys.stderr)
        return 2
    serve_with_ray(settings_from_args(args), setting_overrides(args), replicas=args.replicas)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = build_service_parser()
    sub = _subcommands(parser)
    sub.choices["serve"].set_defaults(func=cmd_serve_any_engine)
    task = sub.add_parser("task", help="create, list, show, update or delete tasks on a running service")
    task_sub = task.add_subparsers(dest="task_command", required=True)

    def command(name: str, func: ClientCommand, help_text: str) -> argparse.ArgumentParser:
        p = task_sub.add_parser(name, help=help_text)
        _connection_options(p)
        p.set_defaults(func=_with_client(func))
        return p

    create = command("create", cmd_task_create, "create a task from a folder with one sub-folder per class")
    create.add_argument("--from-folder", required=True, help="folder/<class>/<image>")
    create.add_argument("--name")
    create.add_argument("--method", help=f"{', '.join(METHODS)} or auto (default: the model's)")
    create.add_argument("--views", type=int, help="augmented views per shot")
    create.add_argument("--no-wait", action="store_true", help="return once uploaded; the build runs on")
    command("list", cmd_task_list, "list tasks (and builds in progress)")
    command("show", cmd_task_show, "one task: method, hyper-parameters, leave-one-out per class").add_argument("task")
    update = command("update", cmd_task_update, "serve another method or rename a task (nothing re-uploaded)")
    update.add_argument("task")
    update.add_argument("--method", help=f"{', '.join(METHODS)} or auto: tuned again on the stored shots")
    names = update.add_mutually_exclusive_group()
    names.add_argument("--name")
    names.add_argument("--clear-name", action="store_true", help="remove the task's name")
    command("delete", cmd_task_delete, "delete tasks").add_argument("tasks", nargs="+", metavar="task")

    classify = sub.add_parser("classify", help="classify images with a task of a running service")
    _connection_options(classify)
    classify.add_argument("task")
    classify.add_argument("images", nargs="+", metavar="image")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--method", help="use this method instead of the task's")
    classify.add_argument("--abstain", action="store_true", help="no label when below the task's threshold")
    classify.add_argument("--evidence", type=int, help="also return the k nearest shots per image")
    classify.set_defaults(func=_with_client(cmd_classify))

    bench = sub.add_parser("bench", help="speed, memory and accuracy benchmarks (writes docs/benchmarks.md)")
    bench.add_argument("--data-dir", type=Path, help="override SHOTCACHE_DATA_DIR (holds the stand-in and exports)")
    try:
        from benchmarks.options import add_arguments
    except ImportError:  # no harness here: `bench` says what is missing when run
        bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(debug=args.verbose)
    try:
        result: int = args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
