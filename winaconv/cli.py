"""The `winaconv` command line."""

import functools
import json
import logging
import os
from pathlib import Path

import click

from winaconv_runtime.checkpoint_format import CheckpointFormatError

from . import __version__
from .errors import WinaconvError
from .interrupts import interrupts_unwind
from .options import (
    DTYPE_NAMES,
    EXPERT_CALIBRATIONS,
    LAYER_ALLOCATIONS,
    METHODS,
    SCORINGS,
    TRANSFORMS,
    UPSTREAMS,
    BenchOptions,
    ConvertOptions,
    EvalOptions,
    GenerateOptions,
    default,
)
from .render import err, print_bench, print_eval, print_inspection, print_summary, progress_bar, say


def one_line_errors(command):
    """Turn expected failures into a one-line `Error: ...` (exit status 1), with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (WinaconvError, CheckpointFormatError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def parse_levels(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.25,0.5; got {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="winaconv")
def main():
    """Convert language models to WINA activation sparsity; the checkpoints decode faster
    through winaconv's runtime (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the checkpoint to.")
@click.option("--method", type=click.Choice(METHODS), default=default(ConvertOptions, "method"), show_default=True,
              help="wina scores |x_i|*||W[:,i]||, teal scores |x_i|.")
@click.option("--scoring", type=click.Choice(SCORINGS), default=default(ConvertOptions, "scoring"), show_default=True,
              help="wina only: column norms on all seven projections (paper) or on k and gate only (reference code).")
@click.option("--transform", type=click.Choice(TRANSFORMS), default=None,
              help="Rotation folded into the weights: exact (per block, WINA's), global (one, from the weights), "
                   "pca (one, from the calibration activations) or none. Default: pca; none for Gemma 2/3, "
                   "which accept none and exact.")
@click.option("--sparsity-levels", default=default(ConvertOptions, "sparsity_levels"), show_default=True,
              callback=parse_levels, help="Model-level sparsities stored in the checkpoint, each in [0, 1).")
@click.option("--default-sparsity", type=float, default=None,
              help="Level used when loading without sparsity= (default: 0.5 if stored, else the stored level nearest it).")
@click.option("--calib-file", type=click.Path(), help="Calibration text: .txt, or .jsonl with a 'text' field.")
@click.option("--calib-dataset", help="Hugging Face dataset for calibration (needs the 'datasets' package and network).")
@click.option("--calib-tokens", type=int, default=default(ConvertOptions, "calib_tokens"), show_default=True,
              help="Calibration tokens for score statistics.")
@click.option("--seq-len", type=int, default=default(ConvertOptions, "seq_len"), show_default=True,
              help="Calibration sequence length.")
@click.option("--greedy-tokens", type=int, default=default(ConvertOptions, "greedy_tokens"), show_default=True,
              help="Tokens the greedy allocation evaluates on.")
@click.option("--greedy-step", type=float, default=default(ConvertOptions, "greedy_step"), show_default=True,
              help="Base step of the greedy allocation.")
@click.option("--layer-allocation", type=click.Choice(LAYER_ALLOCATIONS), default=default(ConvertOptions, "layer_allocation"),
              show_default=True, help="uniform: every layer at each level (TEAL); error / divergence: the level shared "
              "out across layers by each layer's block-output error, or by the model's output divergence with that "
              "layer sparse (calibration runs further per layer; divergence also runs the model per layer and level).")
@click.option("--upstream", type=click.Choice(UPSTREAMS), default=default(ConvertOptions, "upstream"), show_default=True,
              help="Calibrate each layer on the dense model's activations, or on those of the layers before it "
              "made sparse at the default level.")
@click.option("--expert-calibration", type=click.Choice(EXPERT_CALIBRATIONS),
              default=default(ConvertOptions, "expert_calibration"), show_default=True,
              help="Mixture of experts: each routed expert's thresholds from all the layer's experts' scores pooled, "
              "from its own shrunk towards the pooled ones by its token count, or from its own (docs/moe.md).")
@click.option("--device", default=default(ConvertOptions, "device"), show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=default(ConvertOptions, "dtype"), show_default=True,
              help="dtype of the written weights (auto: the model's own).")
@click.option("--seed", type=int, default=default(ConvertOptions, "seed"), show_default=True)
@click.option("--revision", help="Hub revision of MODEL.")
@click.option("--max-shard-size", default=default(ConvertOptions, "max_shard_size"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a previous winaconv checkpoint at --out (nothing else is ever "
              "replaced), and discard an interrupted conversion to --out made with other settings.")
@click.option("--in-memory", is_flag=True, help="Load the whole model with transformers first instead of reading it "
              "layer by layer (more memory, same checkpoint; for sources whose tensor names transformers renames).")
@click.option("--push-to", metavar="REPO_ID", help="After converting, push the checkpoint to this Hub repo (see `winaconv push`).")
@click.option("--push-private", is_flag=True, help="With --push-to: create the repo private.")
@one_line_errors
def convert(model, out, push_to=None, push_private=False, **options):
    """Convert MODEL (a Hub id, a transformers folder or a .gguf file) into a sparse checkpoint.

    The model is read one decoder layer at a time, so memory holds the embeddings, lm_head, about one layer
    and the calibration activations. An interrupted conversion (Ctrl-C, a kill, a power cut) resumes after
    its last finished layer when the same command is run again."""
    from .convert import convert as run_conversion

    if push_to:  # fail before a long conversion, not after it
        from .checkpoint.hub import check_repo_id, resolve_token

        check_repo_id(push_to)
        resolve_token(None)
    opts = ConvertOptions(model=model, out=out, **options)
    with interrupts_unwind(), progress_bar() as progress:
        report = run_conversion(opts, progress=progress, say=say)
    print_summary(report, report.default_sparsity)
    if push_to:
        push_checkpoint(report.out, push_to, private=push_private)


def parse_names(ctx, param, value):
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


trust_checkpoint_code_option = click.option(
    "--trust-checkpoint-code", is_flag=True,
    help="Run the checkpoint folder's own Python files where they differ from the installed winaconv runtime "
         "(refused otherwise: read them first). Without it the model is always built from the installed runtime.")


@main.command("eval")
@click.argument("model")
@click.option("--text-file", type=click.Path(),
              help="Held-out text (.txt, or .jsonl with a 'text' field). Default: the built-in held-out news text "
                   "(needs gensim's wheel: pip install --no-deps gensim).")
@click.option("--sparsity", "levels", callback=lambda ctx, param, v: parse_levels(ctx, param, v) if v else None,
              help="Comma-separated levels to evaluate (default: every stored level, 0 = dense, included).")
@click.option("--window", type=int, default=default(EvalOptions, "window"), show_default=True, help="Tokens per window.")
@click.option("--stride", type=int, default=None,
              help="Tokens between window starts; default: --window (no overlap). Less: overlapping windows, "
                   "each token scored once.")
@click.option("--max-tokens", type=int, help="Use at most this many tokens of the text.")
@click.option("--batch-size", type=int, default=default(EvalOptions, "batch_size"), show_default=True,
              help="Windows per forward pass.")
@click.option("--device", default=default(EvalOptions, "device"), show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=default(EvalOptions, "dtype"), show_default=True,
              help="auto: float32 on CPU, the checkpoint's own dtype on GPU.")
@click.option("--tasks", callback=parse_names, default="",
              help="Zero-shot lm-evaluation-harness tasks, e.g. piqa,arc_easy (needs lm_eval and network).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@trust_checkpoint_code_option
@one_line_errors
def eval_command(model, text_file, levels, window, stride, max_tokens, batch_size, device, dtype, tasks, as_json,
                 trust_checkpoint_code):
    """Perplexity of MODEL (a winaconv checkpoint, or a plain model evaluated dense) on held-out text,
    through the runtime's sparse path at each sparsity level."""
    from transformers.utils import logging as transformers_logging

    from .use.evaluate import evaluate

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: the command shows its own progress
    options = EvalOptions(model=model, text_file=text_file, levels=levels or None, window=window, stride=stride,
                          max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype, tasks=tasks,
                          trust_checkpoint_code=trust_checkpoint_code)
    if as_json:
        report = evaluate(options, say=lambda m: None)
        click.echo(report.to_json())
    else:
        with progress_bar() as progress:
            report = evaluate(options, progress=progress, say=say)
        print_eval(report)
    if report.tasks.get("error"):  # the perplexities are printed, but what was asked for did not all run
        raise click.ClickException(report.tasks["error"])


def push_checkpoint(folder, repo_id, private=False, revision=None, token=None, base_model=None, write_card=True):
    from .checkpoint.hub import push

    url = push(folder, repo_id, private=private, revision=revision, token=token, base_model=base_model,
               write_card=write_card, say=say)
    say(f"pushed {folder} to {repo_id}: {url}")


@main.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created from main if missing). Default: main.")
@click.option("--token", help="Hugging Face token (default: HF_TOKEN, else the token `hf auth login` saved).")
@click.option("--base-model", help="Hub id of the base model for the card, when the checkpoint records a local path.")
@click.option("--no-card", is_flag=True, help="Do not write README.md (the model card) before uploading.")
@one_line_errors
def push_command(folder, repo_id, private, revision, token, base_model, no_card):
    """Upload the checkpoint FOLDER to the Hub repo REPO_ID, with a model card, creating the repo if needed.
    The checkpoint is validated first (as `winaconv inspect` does); a broken one is not pushed."""
    push_checkpoint(folder, repo_id, private=private, revision=revision, token=token, base_model=base_model,
                    write_card=not no_card)


@main.command("inspect")
@click.argument("checkpoint")
@click.option("--sparsity", type=float, help="Level whose per-layer table is shown (default: the checkpoint's default).")
@click.option("--thresholds", is_flag=True, help="Show the thresholds instead of the sparsities in the table.")
@click.option("--revision", help="Hub revision, when CHECKPOINT is a repo id.")
@click.option("--token", help="Hugging Face token for a private repo (default: HF_TOKEN).")
@one_line_errors
def inspect_command(checkpoint, sparsity, thresholds, revision, token):
    """Show what CHECKPOINT (a folder or a Hub repo id) is and check that it is whole: config, sparsity tables,
    runtime files, every tensor and its shape (from the safetensors headers; no weights are loaded).
    Exit status 1 with one line per problem when it is broken."""
    from .checkpoint.inspection import inspect_checkpoint

    inspection = inspect_checkpoint(checkpoint, revision=revision, token=token)
    print_inspection(inspection, sparsity, thresholds)
    for problem in inspection.problems:
        click.echo(f"problem: {problem}", err=True)
    if inspection.problems:
        click.get_current_context().exit(1)


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--sparsity", type=float, help="A stored level (default: the checkpoint's default).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=default(GenerateOptions, "max_new_tokens"),
              show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=default(GenerateOptions, "temperature"), show_default=True)
@click.option("--top-p", type=float, default=default(GenerateOptions, "top_p"), show_default=True)
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="auto", show_default=True)
@trust_checkpoint_code_option
@one_line_errors
def generate(model, prompt, sparsity, max_new_tokens, sample, temperature, top_p, chat, device, dtype,
             trust_checkpoint_code):
    """Stream a completion of PROMPT through model.generate(), then one line of speed (decode ms/token, timed
    after the first tokens, which carry the prompt and the one-time start-up)."""
    from .use.speed import run_generate

    run_generate(model, prompt, sparsity, max_new_tokens, sample, temperature, top_p, chat, device, dtype,
                 trust_checkpoint_code, say=lambda line: err.print(line, soft_wrap=True, markup=False))


@main.command()
@click.argument("model")
@click.option("--levels", default="", callback=parse_levels,
              help="Comma-separated levels (default: every stored level, 0 included).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=default(BenchOptions, "new_tokens"), show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=default(BenchOptions, "prompt_tokens"),
              show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=default(BenchOptions, "batch"), show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--save", is_flag=True, help="Write the speed entries of winaconv_results.json in the checkpoint folder.")
@trust_checkpoint_code_option
@one_line_errors
def bench(model, levels, new_tokens, prompt_tokens, batch, device, dtype, as_json, save, trust_checkpoint_code):
    """Decode ms/token through model.generate() at each level, next to transformers' dense loop."""
    from .use.speed import run_bench, save_speed

    report = run_bench(model, levels, new_tokens, prompt_tokens, batch, device, dtype, save, trust_checkpoint_code)
    if save:
        save_speed(report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_bench(report)


if __name__ == "__main__":
    main()
