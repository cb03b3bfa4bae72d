"""`bard-deploy`: a thin typer CLI over the library (no tensor code here).

Every `BardError` reaches the user as one line (`error: ...`) and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bard_deploy.errors import BardError, NotBuiltError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert Qwen3-VL models into BARD block-diffusion models, export and run them.")
console = Console()
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    """bard-deploy: train, export, generate, bench, inspect."""


def _not_built(command: str, issue: str) -> None:
    raise NotBuiltError(f"'bard-deploy {command}' is not built yet ({issue})", command)


@app.command(context_settings=_PASS_THROUGH)
def train(ctx: typer.Context):
    """Convert an AR VLM into BARD checkpoints (B4 -> B8 -> B16 -> B32). Not built yet."""
    _not_built("train", "the training recipe lands with the 'bard-deploy train' issue")


@app.command(context_settings=_PASS_THROUGH)
def export(ctx: typer.Context):
    """Export the decoder step and vision tower to ONNX (+ INT8, TensorRT). Not built yet."""
    _not_built("export", "ONNX export lands with the 'bard-deploy export --int8' issue")


@app.command(context_settings=_PASS_THROUGH)
def generate(ctx: typer.Context):
    """Decode with the block-diffusion runtime (or the AR baseline). Not built yet."""
    _not_built("generate", "the runtime lands with the runtime issue")


@app.command(context_settings=_PASS_THROUGH)
def bench(ctx: typer.Context):
    """AR vs BARD latency and throughput, side by side. Not built yet."""
    _not_built("bench", "benchmarks land with the 'bard-deploy bench' issue")


@app.command()
def inspect(directory: Path = typer.Argument(..., help="A checkpoint directory.")):
    """Print a checkpoint's summary: architecture, sizes, bard section."""
    from bard_deploy.inspect import checkpoint_summary

    summary = checkpoint_summary(directory)
    table = Table(title=f"checkpoint {directory}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turn user errors into one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        # standalone mode: typer prints its own one-line usage errors and exits 2; our errors come through.
        app(args=argv, prog_name="bard-deploy")
    except BardError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
