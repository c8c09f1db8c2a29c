"""Export a run: the merged model (merged first when missing) as one GGUF file, and for Ollama a
Modelfile next to it, written so that nothing half-written ever carries the final name.

The files are written into a hidden folder inside the export folder, fsynced, and moved into
place with the GGUF last (finetune/fs.py `publish_files`); an interrupted export leaves a hidden
`.NAME.tmp-...` folder and no file under the real names. Existing files are replaced only with
`force`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import ExportError
from finetune.export.families import family_for
from finetune.export.gguf_file import GgufContents, write_gguf
from finetune.export.modelfile import RAW_TEMPLATE, go_template, modelfile_text
from finetune.export.prompt import PromptFormat, prompt_format
from finetune.export.quant import QuantPlan, plan_quant, run_llama_quantize
from finetune.export.vocab import Vocabulary, read_vocabulary
from finetune.fs import hidden_sibling, publish_files

FORMATS = ("gguf", "ollama")
MODELFILE = "Modelfile"
MERGED = "merged"


@dataclass
class ExportReport:
    gguf_file: Path
    modelfile: Path | None
    quant: str
    family: str
    prompt: str
    tensors: int
    size: int
    seconds: float


def export_model(
    config: FinetuneConfig,
    run_dir: str | Path,
    *,
    fmt: str = "gguf",
    quant: str = "f16",
    force: bool = False,
    output_dir: str | Path | None = None,
    merge_arguments: Callable[[], dict] | None = None,
    log: Callable[[str], object] = print,
) -> ExportReport:
    """Write `run_dir`'s fine-tuned model as `<run>-<quant>.gguf` in `output_dir` (default
    `run_dir/export`), plus a `Modelfile` when `fmt` is "ollama".

    The model is `run_dir/merged`; when it is missing, the adapter in `run_dir` is merged first
    with `merge_adapter(**merge_arguments())` (the base model and settings the run used). The
    run's tokenizer and prompt format go into the GGUF metadata (finetune/export/prompt.py).
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    export_dir = Path(output_dir) if output_dir else run_dir / "export"
    stem = run_dir.resolve().name
    file_name = f"{stem}-{quant.strip().lower()}.gguf"
    plan = plan_quant(quant, str(export_dir / f"{stem}-f16.gguf"), str(export_dir / file_name))
    targets = [export_dir / file_name] + ([export_dir / MODELFILE] if fmt == "ollama" else [])
    _refuse_existing(targets, force)

    model_dir = merged_model(run_dir, merge_arguments, log)
    started = time.perf_counter()  # the export's own time, without a merge
    prompt, contents = _contents(config, run_dir, model_dir, stem, plan, log)
    if fmt == "ollama" and prompt.turns_problem is not None:
        raise prompt.turns_problem
    modelfile = (
        _modelfile(file_name, prompt, contents.vocab, config, run_dir) if fmt == "ollama" else None
    )
    log(
        f"exporting {model_dir} ({contents.family.name}) as {plan.name}, with {prompt.description}"
        f" and stop token {prompt.stop!r}"
    )
    tensors, size = _write_files(export_dir, file_name, model_dir, contents, plan, modelfile, log)
    report = ExportReport(
        gguf_file=export_dir / file_name,
        modelfile=export_dir / MODELFILE if modelfile is not None else None,
        quant=plan.name,
        family=contents.family.name,
        prompt=prompt.description,
        tensors=tensors,
        size=size,
        seconds=time.perf_counter() - started,
    )
    log(f"wrote {tensors} tensors, {size / 1e6:.1f} MB in {report.seconds:.1f} s")
    return report


def _contents(config, run_dir: Path, model_dir: Path, name: str, plan: QuantPlan, log):
    """The run's prompt format, and everything the GGUF holds besides the weights."""
    from transformers import AutoConfig

    tokenizer = _run_tokenizer(run_dir, model_dir)
    prompt = prompt_format(config, tokenizer, log)
    family, text = family_for(AutoConfig.from_pretrained(model_dir))
    vocab = read_vocabulary(tokenizer, text.vocab_size, prompt.eos, prompt.stop, log)
    if prompt.chat:  # chat rows were tokenized without the tokenizer's BOS: the template writes it
        vocab.add_bos = vocab.add_eos = False
    contents = GgufContents(
        name=name,
        family=family,
        text_config=text,
        vocab=vocab,
        chat_template=prompt.chat_template,
        file_type=plan.file_type,
        tensor_type=plan.tensor_type,
    )
    return prompt, contents


def _write_files(
    export_dir: Path, file_name: str, model_dir: Path, contents, plan, modelfile: str | None, log
) -> tuple[int, int]:
    """The GGUF (and Modelfile) staged in a hidden folder, then moved in, the GGUF last."""
    export_dir.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(export_dir / file_name)
    staging.mkdir()
    try:
        tensors = _write_model(staging / file_name, model_dir, contents, plan, log)
        if modelfile is not None:
            (staging / MODELFILE).write_text(modelfile, encoding="utf-8")
        size = (staging / file_name).stat().st_size
        publish_files(staging, export_dir, last=file_name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return tensors, size


def merged_model(run_dir: Path, merge_arguments: Callable[[], dict] | None, log) -> Path:
    """`run_dir/merged`, merged now when it is missing."""
    merged = run_dir / MERGED
    if (merged / "config.json").is_file():
        adapter = run_dir / "adapter_model.safetensors"
        if adapter.is_file() and adapter.stat().st_mtime > (merged / "config.json").stat().st_mtime:
            log(
                f"warning: {merged} is older than the adapter; exporting it anyway (run "
                "`finetune merge CONFIG --force` to merge the newer adapter)"
            )
        return merged
    if merge_arguments is None:
        raise ExportError(f"no merged model in {merged}; run `finetune merge CONFIG` first")
    if not (run_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"{run_dir} has neither a merged model nor an adapter; train first (finetune train)"
        )
    from finetune.merge import merge_adapter

    log(f"no merged model in {merged}: merging the adapter first")
    merge_adapter(adapter_dir=run_dir, output_dir=merged, log=log, **merge_arguments())
    return merged


def _refuse_existing(targets: list[Path], force: bool) -> None:
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ExportError(f"{' and '.join(existing)} already {verb}; add --force to replace it")


def _run_tokenizer(run_dir: Path, model_dir: Path):
    """The tokenizer train saved (with the run's chat template), else the merged model's."""
    from transformers import AutoTokenizer

    folder = run_dir if (run_dir / "tokenizer_config.json").is_file() else model_dir
    return AutoTokenizer.from_pretrained(folder)


def _modelfile(
    file_name: str, prompt: PromptFormat, vocab: Vocabulary, config: FinetuneConfig, run_dir: Path
) -> str:
    template = go_template(prompt.turns, vocab.add_bos) if prompt.turns else RAW_TEMPLATE
    stops = list(dict.fromkeys([prompt.stop, vocab.eos_token]))
    return modelfile_text(file_name, template, stops, config.default_system_message, str(run_dir))


def _write_model(path: Path, model_dir: Path, contents: GgufContents, plan: QuantPlan, log) -> int:
    if plan.llama_quantize is None:
        return write_gguf(path, model_dir, contents, log)
    f16 = path.with_name(path.stem + ".f16.gguf")
    tensors = write_gguf(f16, model_dir, contents, log)
    run_llama_quantize(plan.llama_quantize, f16, path, plan.name, log)
    f16.unlink()
    return tensors
