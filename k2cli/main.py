"""The `k2` command: parse, call one library function, print. torch is imported inside commands so --help is instant.

Each command lives in its own module of k2cli/ and is registered here, in the order `k2 --help` lists them.

Every way a command can fail ends here as one line on stderr and a non-zero exit: a K2Error or OSError (the user can
act on it: exit 1), a usage error (exit 2), Ctrl-C (exit 130, saying what was kept where that applies). Anything else
is a bug in k2: one "internal error" line and exit 70, the traceback with K2_DEBUG=1.
"""
import os
import sys

import typer

from k2cli import model_commands, plan
from k2cli import chat
from k2cli import quant_commands
from k2cli import bench
from k2cli import check
from k2cli import convert
from k2cli import download
from k2cli import serve
from k2cli.interrupt import Interrupted
from runtime.errors import K2Error

app = typer.Typer(help="Quantize, convert and run Kimi K2 and its relatives on the hardware you own.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

app.command()(download.download)
app.command()(model_commands.info)
app.command("init-demo")(model_commands.init_demo)
app.command()(model_commands.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(plan.plan)
app.command()(quant_commands.quantize)
app.command()(quant_commands.qat)
app.command("eval")(quant_commands.eval)
app.command()(bench.bench)
app.command()(check.check)
app.command()(convert.convert)

INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def _fail(message: str, code: int):
    typer.echo(message, err=True)
    sys.exit(code)


def main(args: list[str] | None = None):
    try:
        # Not standalone: usage errors and Ctrl-C come back here instead of being printed (and swallowed) by click.
        code = app(args=args, prog_name="k2", standalone_mode=False)
    except K2Error as e:
        _fail(f"error: {e}", 1)
    except Interrupted as e:
        _fail(f"interrupted: {e}", INTERRUPTED)
    except typer.Abort:  # end of input at a prompt
        _fail("interrupted", INTERRUPTED)
    except typer.TyperException as e:  # a usage error: unknown command or option, a value out of range
        ctx = getattr(e, "ctx", None)
        _fail(f"error: {e.format_message()} (see `{ctx.command_path if ctx else 'k2'} --help`)", e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", INTERRUPTED)
    except OSError as e:
        _fail(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)
    except Exception as e:
        if os.environ.get("K2_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (a bug in k2: rerun with K2_DEBUG=1 for the traceback and "
              f"report it)", INTERNAL_ERROR)
    if code == INTERRUPTED:  # click turns Ctrl-C into Exit(130) before it reaches us
        _fail("interrupted", INTERRUPTED)
    sys.exit(code or 0)
