"""What every command shares: --json, error rendering with stable exit codes, progress on stderr."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click

from lmpack.errors import LmpackError
from lmpack.progress import PhaseReporter, no_count, no_progress

EXIT_INTERNAL = 1
EXIT_USAGE = 2  # Click's own code for bad options and arguments


def json_option(func: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(func)


def quiet_option(func: Callable) -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")(func)


def phase_printer(command: str, *, enabled: bool) -> PhaseReporter:
    """Progress lines on stderr, one a phase ("pack: writing ..."); nothing with --quiet or --json."""
    if not enabled:
        return no_progress
    return lambda message: click.echo(f"{command}: {message} ...", err=True)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def handle_errors(func: Callable) -> Callable:
    """Map LmpackError to one line (and a hint) on stderr and its exit code; --debug shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except LmpackError as exc:
            if debug:
                traceback.print_exc()
            if as_json:
                emit_json(
                    {
                        "error": {
                            "type": type(exc).__name__,
                            "message": exc.message,
                            "hint": exc.hint,
                            "exit_code": exc.exit_code,
                            **({"measured": exc.measured} if getattr(exc, "measured", None) else {}),
                            **({"problems": exc.problems} if getattr(exc, "problems", None) else {}),
                        }
                    }
                )
            click.secho(f"error: {exc.message}", fg="red", err=True)
            problems = getattr(exc, "problems", None) or []
            if len(problems) > 1:
                for problem in problems:
                    click.echo(f"  {problem}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing partial was kept", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:  # an lmpack bug: say so plainly
            if debug:
                traceback.print_exc()
            click.secho(f"internal error: {type(exc).__name__}: {exc}", fg="red", err=True)
            click.echo("hint: run again with --debug for the traceback, and report it", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


class StderrReporter:
    """Step lines and progress bars on stderr; silent when the command prints JSON."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def event(self, event: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event == "step-start":
            click.echo(f"[{data['index']}/{data['total']}] {data['step']} ...", err=True)
        elif event == "step-done":
            note = "cached" if data["cached"] else f"{data['seconds']:.1f} s"
            click.echo(f"[{data['index']}/{data['total']}] {data['step']} done ({note})", err=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield no_count
            return
        with click.progressbar(length=total, label=f"      {label}", file=sys.stderr) as bar:
            yield bar.update
