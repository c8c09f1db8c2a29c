"""The `finetune` command line: one thin function per verb."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from finetune.errors import FinetuneError

app = typer.Typer(
    name="finetune",
    help="Fine-tune Hugging Face language models with LoRA, QLoRA and DoRA from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Verbs that take a config accept any config key after it as an override (--learning-rate 1e-4).
WITH_OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
CONFIG_ARG = typer.Argument(..., help="The YAML config file.", show_default=False)
OPTIONAL_CONFIG_ARG = typer.Argument(None, help="The YAML config file.", show_default=False)
OVERRIDES_HELP = "Any config key can follow CONFIG as an override: --learning-rate 1e-4."


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Fine-tune Hugging Face language models with LoRA, QLoRA and DoRA from one YAML file."""


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def validate(
    ctx: typer.Context,
    config: Path = OPTIONAL_CONFIG_ARG,
    schema: bool = typer.Option(False, "--schema", help="Print the config's JSON Schema and exit."),
) -> None:
    """Check a config and print it resolved, every default filled in."""
    from finetune.config import FinetuneConfig
    from finetune.configfile import render_config
    from finetune.hardware import machine_warnings, resolve_for_machine

    if schema:
        typer.echo(json.dumps(FinetuneConfig.model_json_schema(), indent=2))
        return
    if config is None:
        raise typer.BadParameter("give a CONFIG file (or --schema)", param_hint="CONFIG")
    loaded = _load(config, ctx.args)
    for message in machine_warnings(loaded.config):
        typer.echo(f"note (this machine): {message}", err=True)
    typer.echo(f"# {config}: valid. Resolved for this machine:")
    typer.echo(render_config(resolve_for_machine(loaded.config)), nl=False)


def _load(config: Path, overrides: list[str]):
    """The validated config, its warnings printed."""
    from finetune.configfile import load_config

    loaded = load_config(config, overrides)
    for message in loaded.warnings:
        _warn(message)
    return loaded


def _not_built(verb: str, issue: int) -> None:
    typer.echo(
        f"finetune {verb}: not built yet (tracked in issue #{issue}); nothing was done.", err=True
    )
    raise typer.Exit(1)


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def preprocess(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    debug_num_examples: int = typer.Option(
        3, "--debug-num-examples", help="With --debug: how many samples to show token by token."
    ),
) -> None:
    """Load, format, tokenize, mask and cache the datasets (--debug shows the label mask)."""
    from rich.console import Console

    from finetune.data.mask_view import show_label_mask
    from finetune.data.prepare import format_summary, prepare_datasets
    from finetune.model import load_tokenizer

    loaded = _load(config, ctx.args)
    tokenizer = load_tokenizer(loaded.config)
    prepared = prepare_datasets(loaded.config, tokenizer, log=typer.echo)
    typer.echo(format_summary(prepared.summary))
    if ctx.find_root().params.get("debug"):
        show_label_mask(prepared.train, tokenizer, debug_num_examples, Console())


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def train(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest complete checkpoint in output_dir."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a finished run in output_dir."),
) -> None:
    """Preprocess if needed, load the model, attach the adapter and train."""
    from finetune.hardware import resolve_for_machine
    from finetune.train import train as run_training

    loaded = _load(config, ctx.args)
    result = run_training(
        resolve_for_machine(loaded.config), resume=resume, force=force, log=typer.echo
    )
    typer.echo(
        f"done: {result.global_step} steps; adapter, tokenizer and logs in {result.output_dir}"
    )


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def merge(ctx: typer.Context, config: Path = CONFIG_ARG) -> None:
    """Fold the trained adapter into the base weights."""
    _not_built("merge", 6)


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def inference(ctx: typer.Context, config: Path = CONFIG_ARG) -> None:
    """Generate with the trained adapter, the merged model or the base."""
    _not_built("inference", 7)


def main(argv: list[str] | None = None) -> None:
    """Entry point. User errors print in a line or two and exit 2; --debug shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    # `--debug` may come anywhere (after the config too); it is a global option.
    debug = "--debug" in args
    if debug:
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        app(args=args, prog_name="finetune")
    except FinetuneError as exc:
        if debug:
            raise
        typer.echo(str(exc), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        typer.echo(
            f"finetune: internal error: {type(exc).__name__}: {exc}\n"
            "Run again with --debug for the traceback, and please report it.",
            err=True,
        )
        sys.exit(1)
