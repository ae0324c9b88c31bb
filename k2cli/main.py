"""The `k2` command: parse, call one library function, print. torch is imported inside commands so --help is instant.

Each command lives in its own module of k2cli/ and is registered here, in the order `k2 --help` lists them.
"""
import sys

import typer

from k2cli import model_commands, plan
from k2cli import chat
from k2cli import quant_commands
from k2cli import bench
from k2cli import convert
from k2cli import download
from runtime.errors import K2Error

app = typer.Typer(help="Quantize, convert and run Kimi K2 and its relatives on the hardware you own.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

app.command()(download.download)
app.command()(model_commands.info)
app.command("init-demo")(model_commands.init_demo)
app.command()(model_commands.generate)
app.command()(chat.chat)
app.command()(plan.plan)
app.command()(quant_commands.quantize)
app.command("eval")(quant_commands.eval)
app.command()(bench.bench)
app.command()(convert.convert)


def main():
    try:
        app()
    except K2Error as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        typer.echo(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", err=True)
        sys.exit(1)
