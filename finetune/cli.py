"""The `finetune` command line: one thin function per verb."""

from __future__ import annotations

import json
import os
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
    from finetune.config import FinetuneConfig, render_config
    from finetune.machine import machine_warnings, resolve_for_machine
    from finetune.model.source import base_model_warnings

    if schema:
        typer.echo(json.dumps(FinetuneConfig.model_json_schema(), indent=2))
        return
    if config is None:
        raise typer.BadParameter("give a CONFIG file (or --schema)", param_hint="CONFIG")
    loaded = _load(config, ctx.args)
    for message in machine_warnings(loaded.config) + base_model_warnings(loaded.config):
        typer.echo(f"note (this machine): {message}", err=True)
    typer.echo(f"# {config}: valid. Resolved for this machine:")
    typer.echo(render_config(resolve_for_machine(loaded.config)), nl=False)


def _load(config: Path, overrides: list[str]):
    """The validated config, its warnings printed."""
    from finetune.config import load_config

    loaded = load_config(config, overrides)
    for message in loaded.warnings:
        _warn(message)
    return loaded


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
    from finetune.data.prepare import prepare_datasets
    from finetune.data.summary import format_summary
    from finetune.model.load import load_tokenizer

    loaded = _load(config, ctx.args)
    tokenizer = load_tokenizer(loaded.config)
    prepared = prepare_datasets(loaded.config, tokenizer, log=typer.echo)
    typer.echo(format_summary(prepared.summary))
    if loaded.config.sample_packing:
        from finetune.data.packing import pack_into_bins, packing_efficiency

        lengths, capacity = prepared.train["length"], loaded.config.sequence_len
        bins = pack_into_bins(lengths, capacity, loaded.config.seed)
        typer.echo(
            f"packing: {len(bins)} rows of {capacity} tokens, efficiency "
            f"{packing_efficiency(lengths, bins, capacity):.3f} (real tokens / token slots)"
        )
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
    num_processes: int = typer.Option(
        None,
        "--num-processes",
        min=1,
        help="Re-launch on N processes (accelerate launch; torchrun on CPU).",
    ),
) -> None:
    """Preprocess if needed, load the model, attach the adapter and train."""
    from finetune.machine import resolve_for_machine
    from finetune.train import train as run_training

    loaded = _load(config, ctx.args)
    if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(num_processes))
    result = run_training(
        resolve_for_machine(loaded.config), resume=resume, force=force, log=typer.echo
    )
    if int(os.environ.get("RANK", "0")) == 0:  # one process speaks for all
        typer.echo(
            f"done: {result.global_step} steps; adapter, tokenizer and logs in {result.output_dir}"
        )


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def merge(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    lora_model_dir: Path = typer.Option(
        None, "--lora-model-dir", help="The adapter to merge [default: the config's output_dir]."
    ),
    output_dir: Path = typer.Option(
        None, "--output-dir", help="Where the merged model goes [default: OUTPUT_DIR/merged]."
    ),
    dtype: str = typer.Option(
        None, "--dtype", help="bf16, fp16 or fp32 [default: the base checkpoint's dtype]."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    verify: bool = typer.Option(
        None,
        "--verify/--no-verify",
        help="Compare the merged model's logits with base+adapter [default: when it fits in RAM].",
        show_default=False,
    ),
    nf4_roundtrip: bool = typer.Option(
        False,
        "--nf4-roundtrip",
        help="QLoRA: round the quantized layers through nf4 first, so the merged model computes "
        "what training saw. Default: merge into the original full-precision weights, which are "
        "slightly off from what the adapter was trained against, but keep the base's precision.",
    ),
) -> None:
    """Fold the trained adapter into the base weights, shard by shard, in bounded memory."""
    from finetune.merge import merge_adapter
    from finetune.model.load import compute_dtype_name
    from finetune.model.source import resolve_base_model

    loaded = _load(config, ctx.args).config
    adapter = lora_model_dir or Path(loaded.output_dir)
    compute = compute_dtype_name(loaded)
    report = merge_adapter(
        resolve_base_model(loaded.base_model),
        adapter,
        output_dir or adapter / "merged",
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        nf4_roundtrip=nf4_roundtrip,
        nf4_compute_dtype=compute,
        nf4_double_quant=loaded.bnb_config_kwargs.get("bnb_4bit_use_double_quant", True),
        verify=verify,
        revision=loaded.revision_of_model,
        log=typer.echo,
    )
    typer.echo(f"merged model ({report.dtype}, {report.shards} shard(s)) in {report.output_dir}")


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def inference(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    prompt: str = typer.Option(None, "--prompt", help="Answer this prompt and exit."),
    chat: bool = typer.Option(False, "--chat", help="An interactive chat that keeps history."),
    merged: bool = typer.Option(False, "--merged", help="Use OUTPUT_DIR/merged (after merge)."),
    base: bool = typer.Option(False, "--base", help="Use the untouched base model."),
    system: str = typer.Option(None, "--system", help="A system message for every conversation."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
) -> None:
    """Talk to the trained adapter (default), the merged model or the base.

    With neither --prompt nor --chat, each line of standard input is one prompt.
    """
    from finetune.inference import chat_loop, generate_reply, load_for_inference
    from finetune.model.source import resolve_base_model

    loaded = _load(config, ctx.args).config
    if merged and base:
        raise typer.BadParameter("choose one of --merged and --base")
    run_dir = Path(loaded.output_dir)
    if merged:
        model, tokenizer = load_for_inference(run_dir / "merged")
    elif base:
        model, tokenizer = load_for_inference(resolve_base_model(loaded.base_model))
    else:
        model, tokenizer = load_for_inference(resolve_base_model(loaded.base_model), run_dir)
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    head = [{"role": "system", "content": system}] if system else []

    def stream(piece: str) -> None:
        typer.echo(piece, nl=False)

    if chat:
        typer.echo("Chat: /reset clears the history, /exit quits.", err=True)
        chat_loop(
            model,
            tokenizer,
            read_line=_read_prompt_line,
            write=lambda text: typer.echo(text, nl=False),
            system_prompt=system,
            **options,
        )
        return
    prompts = [prompt] if prompt is not None else [line.rstrip("\n") for line in sys.stdin]
    for text in (p for p in prompts if p.strip()):
        generate_reply(
            model, tokenizer, [*head, {"role": "user", "content": text}], stream=stream, **options
        )
        typer.echo("")


def _relaunch(num_processes: int) -> int:
    """Run this same command on N processes; its exit code."""
    import subprocess

    import torch

    from finetune.train.launch import relaunch_command

    command = relaunch_command(sys.argv[1:], num_processes, cuda=torch.cuda.is_available())
    typer.echo("launching: " + " ".join(command), err=True)
    return subprocess.call(command)


def _read_prompt_line() -> str | None:
    try:
        return input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None


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
