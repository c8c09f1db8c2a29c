"""The `finetune` command line: one thin function per verb.

Longer than the ~400-line guide because it holds every verb with its options and their help
text (the `--help` users read); each verb's body only loads the config and calls one library
function.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer

from finetune import __version__
from finetune.errors import FinetuneError

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="finetune",
    help="Fine-tune Hugging Face language models with LoRA, QLoRA and DoRA from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP,
)

# Verbs that take a config accept any config key after it as an override (--learning-rate 1e-4).
WITH_OVERRIDES = {**HELP, "allow_extra_args": True, "ignore_unknown_options": True}
CONFIG_ARG = typer.Argument(
    ...,
    help="The YAML config file. Relative paths inside it are read from the working directory, "
    "else from the config's folder.",
    show_default=False,
)
OPTIONAL_CONFIG_ARG = typer.Argument(None, help="The YAML config file.", show_default=False)


def unset_by_default(flag: str, help: str, **options):
    """An option that is None unless given: the library then decides, as the help says."""
    return typer.Option(None, flag, help=help, show_default=False, **options)


OVERRIDES_HELP = (
    "Any config key can follow CONFIG as an override: --learning-rate 1e-4, --max-steps=10, "
    "--sample-packing / --no-sample-packing."
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    traceback: bool = typer.Option(
        False, "--traceback", help="Show the full traceback when a command fails."
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Fine-tune Hugging Face language models with LoRA, QLoRA and DoRA from one YAML file."""


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def validate(
    ctx: typer.Context,
    config: Path = OPTIONAL_CONFIG_ARG,
    schema: bool = typer.Option(
        False, "--schema", help="Print the JSON Schema of the config file and exit."
    ),
    fast: bool = typer.Option(
        False, "--fast", help="Skip reading the data files' rows (their existence is checked)."
    ),
) -> None:
    """Check a config and everything it points at; print it resolved, every default filled in.

    Passing means preprocess and train will not fail on their input: data files exist, parse
    and have the fields their type needs; templates and local models exist; Hub ids are well
    formed (and cached, when offline).
    """
    from finetune.config import render_config
    from finetune.config.reference import json_schema
    from finetune.machine import machine_warnings, resolve_for_machine
    from finetune.model.source import base_model_warnings

    if schema:
        typer.echo(json.dumps(json_schema(), indent=2))
        return
    if config is None:
        raise typer.BadParameter("give a CONFIG file (or --schema)", param_hint="CONFIG")
    loaded = _load(config, ctx.args, sample_data=not fast)
    for message in machine_warnings(loaded.config) + base_model_warnings(loaded.config):
        typer.echo(f"note (this machine): {message}", err=True)
    typer.echo(f"# {config}: valid. Resolved for this machine:")
    typer.echo(render_config(resolve_for_machine(loaded.config)), nl=False)


def _load(config: Path, overrides: list[str], sample_data: bool = True, check: bool = True):
    """The validated config, its warnings printed; with `check`, its inputs checked too (verbs
    that act on a finished run need the run folder, not the data)."""
    from finetune.config import load_config
    from finetune.preflight import raise_problems

    loaded = load_config(config, overrides)
    notes = raise_problems(loaded, sample_data) if check else []
    for message in loaded.warnings + notes:
        _warn(message)
    return loaded


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def preprocess(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    debug: bool = typer.Option(
        False,
        "--debug",
        help="Show samples token by token: each token's text, id and label (-100 = masked).",
    ),
    debug_num_examples: int = typer.Option(
        3, "--debug-num-examples", help="With --debug: how many samples to show."
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
    if debug:
        show_label_mask(prepared.train, tokenizer, debug_num_examples, Console())


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def train(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest complete checkpoint in output_dir."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Start over: the previous run in output_dir (checkpoints, merged/, logs) moves "
        "aside and is deleted once the new run has finished.",
    ),
    num_processes: int = typer.Option(
        None,
        "--num-processes",
        min=1,
        help="Re-launch on N processes (accelerate launch; torchrun on CPU).",
    ),
    plan: bool = unset_by_default(
        "--plan/--no-plan",
        "Predict peak memory before loading the model and warn if it will not fit "
        "(default: unless the run is so short that the plan would cost over 2% of it).",
    ),
) -> None:
    """Preprocess if needed, load the model, attach the adapter and train."""
    from finetune.train import train as run_training

    loaded = _load(config, ctx.args)
    if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_relaunch(num_processes))

    def plan_memory(resolved, lengths, log) -> None:
        from finetune.plan.at_start import plan_at_start

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        plan_at_start(resolved, lengths, log, choice=plan, world_size=world_size)

    result = run_training(
        loaded.config, resume=resume, force=force, log=typer.echo, before_model=plan_memory
    )
    if int(os.environ.get("RANK", "0")) == 0:  # one process speaks for all
        typer.echo(
            f"done: {result.global_step} steps; adapter, tokenizer and logs in {result.output_dir}"
        )


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def plan(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    gpu: str = unset_by_default(
        "--gpu", "Plan for this GPU (H100-80GB, A100-40GB, L4, ...; default: this machine's CPU)."
    ),
    num_gpus: int = typer.Option(
        1, "--num-gpus", min=1, help="With --gpu: how many, one process each."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
) -> None:
    """Predict the run's peak memory, disk and time per epoch before training, and whether it
    fits; when it does not, the single change that makes it fit.

    Measures three steps of a 1- and 2-layer copy of the model (random weights: nothing is
    downloaded but the model's config) and scales them to every layer.
    """
    from finetune.plan import make_plan
    from finetune.plan.gpus import find_gpu, gpu_names
    from finetune.plan.report import format_plan

    loaded = _load(config, ctx.args, sample_data=False)
    card = None
    if gpu is not None:
        card = find_gpu(gpu)
        if card is None:
            raise FinetuneError(f"--gpu {gpu}: not a GPU the planner knows; one of {gpu_names()}")
    # Libraries that log to standard output while the steps run must not spoil --json.
    with contextlib.redirect_stdout(sys.stderr):
        result = make_plan(loaded.config, card, num_gpus, log=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(result.as_json(), indent=2) if as_json else format_plan(result))


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def merge(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    lora_model_dir: Path = unset_by_default(
        "--lora-model-dir",
        "The adapter folder to merge (a run's output_dir or a checkpoint-N in it) "
        "(default: the config's output_dir).",
    ),
    output_dir: Path = unset_by_default(
        "--output-dir",
        "Where the merged model goes (default: OUTPUT_DIR/merged).",
    ),
    dtype: str = unset_by_default(
        "--dtype",
        "bf16, fp16 or fp32 (default: the base checkpoint's dtype).",
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="Largest output shard (5GB, 500MB, 2GiB)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    verify: bool = unset_by_default(
        "--verify/--no-verify",
        "Compare the merged model's logits with base+adapter (default: when it fits in RAM).",
    ),
    nf4_roundtrip: bool = typer.Option(
        False,
        "--nf4-roundtrip",
        help="QLoRA: round the quantized layers through nf4 first, so the merged model computes "
        "what training saw. Default: merge into the original full-precision weights, which are "
        "slightly off from what the adapter was trained against, but keep the base's precision.",
    ),
) -> None:
    """Fold the trained adapter into the base weights, shard by shard, in bounded memory.

    Reads what the run used from OUTPUT_DIR/run.json (base model, revision, precision, 4-bit
    settings); the YAML counts only for keys given on the command line.
    """
    from finetune.merge import merge_adapter
    from finetune.runfolder import merge_settings, read_record, run_config

    loaded = _load(config, ctx.args, check=False)
    run_dir = Path(loaded.config.output_dir)
    adapter = lora_model_dir or run_dir
    settings = run_config(loaded, run_dir)
    report = merge_adapter(
        adapter_dir=adapter,
        output_dir=output_dir or adapter / "merged",
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        nf4_roundtrip=nf4_roundtrip,
        verify=verify,
        log=typer.echo,
        **merge_settings(settings, read_record(run_dir)),
    )
    typer.echo(f"merged model ({report.dtype}, {report.shards} shard(s)) in {report.output_dir}")


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def export(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    export_format: str = typer.Option(
        "gguf",
        "--format",
        help="gguf: one GGUF file (llama.cpp, LM Studio); ollama: the GGUF and a Modelfile.",
    ),
    quant: str = typer.Option(
        "f16",
        "--quant",
        help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1; K-quants (q4_k_m, q6_k, ...) go "
        "through llama.cpp's llama-quantize when it is on PATH.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing export files."),
    output_dir: Path = unset_by_default(
        "--output-dir",
        "Where the files go (default: OUTPUT_DIR/export).",
    ),
) -> None:
    """Write the fine-tuned model as one GGUF file, with the run's tokenizer and prompt format
    (merging first when OUTPUT_DIR/merged is missing); the file's path is printed last."""
    from finetune.export import export_model
    from finetune.runfolder import merge_settings, read_record, run_config

    loaded = _load(config, ctx.args, check=False)
    run_dir = Path(loaded.config.output_dir)
    settings = run_config(loaded, run_dir)
    report = export_model(
        settings,
        run_dir,
        fmt=export_format,
        quant=quant,
        force=force,
        output_dir=output_dir,
        merge_arguments=lambda: merge_settings(settings, read_record(run_dir)),
        log=typer.echo,
    )
    if report.modelfile is not None:
        typer.echo(f"Modelfile: {report.modelfile} (ollama create NAME -f {report.modelfile})")
    typer.echo(str(report.gguf_file))


@app.command(name="eval", context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def eval_(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    data: Path = unset_by_default(
        "--data",
        "Held-out rows from this file (default: the run's val_set_size / test_datasets).",
    ),
    data_type: str = unset_by_default(
        "--type",
        "The --data file's dataset type (default: the type of the run's first dataset).",
    ),
    merged: bool = typer.Option(
        False,
        "--merged",
        help="Evaluate OUTPUT_DIR/merged and check that it computes what base + adapter does.",
    ),
    gguf: Path = unset_by_default(
        "--gguf",
        "Also check that this exported GGUF file gives the fine-tuned model's greedy answers.",
    ),
    show: int = typer.Option(
        0, "--show", min=0, help="List the N worst regressions and the N best gains."
    ),
    max_samples: int = typer.Option(
        None, "--max-samples", min=1, help="Only the first N held-out samples (a quick look)."
    ),
    max_new_tokens: int = unset_by_default(
        "--max-new-tokens",
        "Longest answer (default: each reference's length + 32 tokens).",
        min=1,
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts answered at once."),
    lm_eval: str = unset_by_default(
        "--lm-eval",
        "Also run these lm-evaluation-harness tasks (comma list; pip install 'finetune[eval]').",
    ),
) -> None:
    """Held-out loss, perplexity and greedy answers of the base and the fine-tuned model, on the
    same samples with the run's template and masking; writes OUTPUT_DIR/eval.json."""
    from finetune.evaluate import evaluate_run
    from finetune.runfolder import read_record, run_config

    loaded = _load(config, ctx.args, check=False)
    run_dir = Path(loaded.config.output_dir)
    evaluate_run(
        run_config(loaded, run_dir),
        run_dir,
        read_record(run_dir),
        data=data,
        data_type=data_type,
        merged=merged,
        gguf=gguf,
        lm_eval_tasks=[t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None,
        max_samples=max_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show=show,
        log=typer.echo,
    )


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def push(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    what: str = typer.Option(
        "adapter",
        "--what",
        help="adapter (OUTPUT_DIR, with checkpoints per hub_strategy), merged (OUTPUT_DIR/merged) "
        "or gguf (OUTPUT_DIR/export).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be uploaded where, and stop (no network)."
    ),
) -> None:
    """Upload the run's adapter, merged model or GGUF export to the Hub repo hub_model_id, in
    one commit (--hub-model-id you/name overrides the config's)."""
    from finetune.push import plan_push, push
    from finetune.runfolder import run_config

    loaded = _load(config, ctx.args, check=False)
    run_dir = Path(loaded.config.output_dir)
    plan = plan_push(run_config(loaded, run_dir), run_dir, what)
    if dry_run:
        typer.echo(f"would push to {plan.repo_id} from {plan.folder}:")
        typer.echo("\n".join(f"  {name}" for name in plan.files))
        return
    typer.echo(push(plan, log=typer.echo))


@app.command(context_settings=WITH_OVERRIDES, epilog=OVERRIDES_HELP)
def inference(
    ctx: typer.Context,
    config: Path = CONFIG_ARG,
    prompt: str = typer.Option(None, "--prompt", help="Answer this prompt and exit."),
    chat: bool = typer.Option(False, "--chat", help="An interactive chat that keeps history."),
    merged: bool = typer.Option(False, "--merged", help="Use OUTPUT_DIR/merged (after merge)."),
    base: bool = typer.Option(
        False, "--base", help="Use the untouched base model (prompts formatted as the run's)."
    ),
    system: str = typer.Option(None, "--system", help="A system message for every conversation."),
    show_prompt: bool = typer.Option(
        False, "--show-prompt", help="Print the exact prompt text and its token count first."
    ),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", min=1, help="Stop after this many new tokens per reply."
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", min=0.0, help="Sampling temperature; 0 = greedy."
    ),
    top_p: float = typer.Option(
        1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep this much probability."
    ),
) -> None:
    """Talk to the trained adapter (default), the merged model or the base.

    Prompts are formatted exactly as training formatted them: the run's chat template for chat
    data, else its dataset type's prompt (alpaca, a custom format, completion, input_output).
    With neither --prompt nor --chat, each line of standard input is one prompt.
    """
    from finetune.inference import chat_loop, generate_reply, load_for_inference, prompt_format
    from finetune.runfolder import merge_settings, read_record, run_config

    loaded = _load(config, ctx.args, check=False)
    if merged and base:
        raise typer.BadParameter("choose one of --merged and --base")
    run_dir = Path(loaded.config.output_dir)
    record = read_record(run_dir)
    run = run_config(loaded, run_dir)
    base_model = merge_settings(run, record)["base"]
    remote = {"trust_remote_code": run.trust_remote_code}
    if merged:
        model, tokenizer = load_for_inference(run_dir / "merged", model_kwargs=remote)
    else:
        model, tokenizer = load_for_inference(
            base_model,
            None if base else run_dir,
            model_kwargs={**remote, "revision": run.revision_of_model},
            tokenizer_dir=run_dir if base and record else None,
        )
    fmt = prompt_format(run if record else None, tokenizer)
    if chat and not fmt.is_chat:
        raise typer.BadParameter(
            f"this run trained single prompts ({fmt.name}), not conversations; use --prompt "
            "or lines on stdin"
        )
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    head = [{"role": "system", "content": system}] if system else []

    def stream(piece: str) -> None:
        typer.echo(piece, nl=False)

    def print_prompt(text: str, tokens: int) -> None:
        typer.echo(f"--- prompt ({tokens} tokens) ---\n{text}\n--- reply ---")

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
            model,
            tokenizer,
            [*head, {"role": "user", "content": text}],
            stream=stream,
            fmt=fmt,
            show_prompt=print_prompt if show_prompt else None,
            **options,
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
    """Entry point. User errors print in a line or two and exit 2, in every mode;
    --traceback shows the traceback."""
    from finetune.machine import use_huge_pages_for_tensors

    use_huge_pages_for_tensors()  # before torch loads: large CPU tensors in 2 MB pages
    args = list(sys.argv[1:] if argv is None else argv)
    # `--traceback` may come anywhere (after the config too); it is a global option.
    traceback = "--traceback" in args
    if traceback:
        args = ["--traceback", *(a for a in args if a != "--traceback")]
    verb = next((a for a in args if not a.startswith("-")), None)
    if "--debug" in args and verb != "preprocess":
        typer.echo(
            "--debug shows the label mask and belongs to `finetune preprocess CONFIG --debug`; "
            "to see a traceback, add --traceback",
            err=True,
        )
        sys.exit(2)
    try:
        app(args=args, prog_name="finetune")
    except FinetuneError as exc:
        if traceback:
            import traceback as stack

            stack.print_exc()
        typer.echo(str(exc), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if traceback:
            raise
        typer.echo(
            f"finetune: internal error: {type(exc).__name__}: {exc}\n"
            "Run again with --traceback for the traceback, and please report it.",
            err=True,
        )
        sys.exit(1)
