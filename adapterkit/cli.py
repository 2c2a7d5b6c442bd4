"""The `adapterkit` command line: each command parses its options and calls one library function.

Exit codes: 0 success, 2 bad input (one-line message, no traceback), 1 unexpected error.
"""

from __future__ import annotations

import os
import sys

import click

from .cli_options import BASE_HELP, SPEC_HELP, device_options, generation_options, sampler_options, with_options
from .errors import AdapterkitError, first_line
from .merge import methods as merge_methods  # the merge registry: names, defaults, choices (no torch)
from .threads import configure_threads


class AdapterkitGroup(click.Group):
    """Turns expected errors into one line + exit 2, and unexpected ones into one line + exit 1 (traceback with -v)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AdapterkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence: report, exit 1
            if os.environ.get("ADAPTERKIT_DEBUG"):
                raise
            click.echo(f"unexpected error: {type(e).__name__}: {first_line(e) if str(e).strip() else ''} "
                       "(set ADAPTERKIT_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=AdapterkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog="New here? `adapterkit demo` runs the whole loop on the bundled base in a few minutes on a CPU. "
                    "`adapterkit COMMAND --help` explains a command.")
@click.version_option(package_name="adapterkit")
def main():
    """Train, merge, evaluate and hot-swap lightweight task adapters for InstructPix2Pix."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads()  # before any command imports torch: OpenMP threads sleep, not spin (adapterkit/threads.py)


@main.command("edit", short_help="Edit images (or a --jobs file) with adapters.")
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False), help="Adapter folder (repeatable). With several, each image is routed by instruction." + SPEC_HELP)
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--instruction", help="The edit instruction (single-image mode).")
@click.option("--jobs", type=click.Path(dir_okay=False), help='JSON lines {"image", "instruction", "adapter"?, "seed"?}: one base load, --batch-size jobs per call.')
@click.option("--output", required=True, type=click.Path(), help="Output image path (one image) or folder (several images, or --jobs).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="--jobs: jobs per pipeline call, adapters mixed in one batch; 1: one at a time.")
@click.option("--force", is_flag=True, help="Load adapters made for another base fingerprint (shapes must still match).")
@click.option("--overwrite", is_flag=True, help="Let an output replace an input image (edit in place).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@with_options(generation_options)
def edit_command(adapters, images, instruction, jobs, output, batch_size, force, quiet, base, **options):
    """Edit IMAGES (files, or folders of them) with an instruction, or run a --jobs file, on a base with optional adapters."""
    from .edit import edit, edit_jobs

    if jobs:
        if images or instruction:
            raise AdapterkitError("--jobs takes its images and instructions from the file; drop IMAGE and --instruction")
        result = edit_jobs(base, jobs, output, adapters=list(adapters), force=force, quiet=quiet, batch_size=batch_size, log=_stderr, **options)
        for line in result.errors:
            click.echo(f"skipped {line}", err=True)
        click.echo(f"{len(result.outputs)} edited, {len(result.errors)} skipped, {result.batches} batches -> {output}")
        if not result.outputs and result.errors:
            sys.exit(2)
        return
    if not instruction:
        raise AdapterkitError("--instruction is required (or use --jobs FILE)")
    outputs = edit(base, list(images), instruction, output, adapters=list(adapters), force=force, quiet=quiet, log=_stderr, **options)
    click.echo("\n".join(outputs))


def _stderr(line: str) -> None:
    click.echo(line, err=True)


@main.command("convert-base", short_help="Turn an SD1.5 pipeline into an IP2P base.")
@click.argument("source")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the converted IP2P pipeline.")
@click.option("--overwrite", is_flag=True, help="Replace what --output holds if it is not an earlier conversion (SOURCE itself, say).")
def convert_base_command(source, output, overwrite):
    """Convert an SD1.5 text-to-image pipeline (hub id or folder) into an 8-channel IP2P base."""
    from .base import convert_base

    click.echo(convert_base(source, output, overwrite=overwrite))


@main.command("make-tiny-base", short_help="Write a tiny random IP2P pipeline (for tests).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the pipeline.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace what --output holds if it is not an earlier tiny pipeline.")
def make_tiny_base_command(output, seed, overwrite):
    """Write a tiny random-weight IP2P pipeline (what builtin:tiny-random builds) as a diffusers folder."""
    from .tiny import save_tiny_pipeline

    click.echo(save_tiny_pipeline(output, seed=seed, overwrite=overwrite))


# Commands of later issues register below, one block each: train, merge, eval, demo.


# --- eval command (issue 5) ---
@main.command("eval", short_help="Score adapters and merges: report and grids.")
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--data", required=True, help="Dataset: hub id, datasets.save_to_disk folder, or folder with metadata.jsonl or metadata.csv.")
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Adapter or merged-adapter folder (repeatable); each becomes a column beside the base." + SPEC_HELP)
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Report folder: report.json, report.html, grids/, images/, cache/ (re-runs reuse the cache).")
@click.option("--preset", default=None, help="Column preset of the data: ip2p, cartoonization or low-level.")
@click.option("--input-column", default=None, help="Input image column (overrides the preset).")
@click.option("--target-column", default=None, help="Target image column (overrides the preset).")
@click.option("--instruction-column", default=None, help="Instruction column (overrides the preset).")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Judge at most this many rows per task.")
@click.option("--task-rows", default="auto", show_default=True, type=click.Choice(["auto", "match", "all"]),
              help="Rows per task: match (instructions of that task), all (every row), auto (all for a single-task "
                   "dataset with one task evaluated, else match).")
@click.option("--instructions", default="data", show_default=True, type=click.Choice(["data", "adapter"]),
              help="Instruction per row: the row's own, or the task adapter's stored instructions in turn.")
@click.option("--clip-model", default=None, help="CLIP checkpoint (folder or hub id) for CLIP image and directional similarity.")
@with_options(sampler_options)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="Rows of one column per pipeline call (outputs match one-at-a-time to 1/255); 1: one at a time.")
@click.option("--seed", default=0, show_default=True, type=int, help="Row r uses seed + r in every column.")
@click.option("--resolution", default=None, type=click.IntRange(8, 4096),
              help="Shorter side of the inputs (multiples of 8). Default: the base's own resolution, else 256.")
@with_options(device_options)
@click.option("--force", is_flag=True, help="Load adapters made for another base fingerprint (shapes must still match).")
@click.option("--overwrite", is_flag=True, help="Replace --output's images/ even if it holds files an earlier eval did not write.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(adapters, **options):
    """Judge adapters and merges side by side against the base: metrics, report.html and image grids."""
    from .eval import evaluate

    result = evaluate(adapters=list(adapters), **options)
    click.echo(result.table)
    click.echo(f"{result.generated} images generated, {result.cached} from cache -> {result.files['html']}")


# --- import command (issue 17) ---
@main.command("import", short_help="Adopt an adapter written by diffusers' scripts.")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--base", required=True, help=BASE_HELP + " The weights are checked against it.")
@click.option("--task", required=True, help="Task name of the adapter, e.g. derain.")
@click.option("--instruction", "instructions", multiple=True, required=True, help="An instruction that invokes the task (repeatable).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the adopted adapter (the source is left as it is).")
@click.option("--force", is_flag=True, help="Accept an adapter.json fingerprint of another base (shapes must still match).")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of another task or method already in --output.")
def import_command(folder, **options):
    """Adopt a folder written elsewhere (diffusers' training scripts): check it, write adapter.json and a model card."""
    from .adopt import adopt, describe

    click.echo(describe(adopt(folder, **options)))


# --- merge command (issue 4) ---
@main.command("merge", short_help="Merge task adapters into one (least squares).")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--method", default="lsq", show_default=True, type=click.Choice(list(merge_methods.METHODS)),
              help="lsq: constrained least squares on attn2 K/V; the others are exact baselines on full deltas.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the merged adapter.")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, in order (sum, linear, ties, dare, svd).")
@click.option("--density", default=merge_methods.DEFAULT_DENSITY, show_default=True, type=float, help="ties/dare: fraction of each delta kept.")
@click.option("--seed", default=0, show_default=True, type=int, help="dare: seed of the drop masks.")
@click.option("--rank", default=None, type=click.IntRange(1), help="svd: rank the exact sum is truncated to.")
@click.option("--target-weight", default=merge_methods.DEFAULT_TARGET_WEIGHT, show_default=True, type=float, help="lsq-soft: weight lambda of the targets.")
@click.option("--ridge", default=None, type=float,
              help=f"lsq: ridge on M, relative to its mean eigenvalue (default {merge_methods.BASE_INSTRUCTIONS_RIDGE:g} "
                   f"where the base's own instructions are weighted in, else {merge_methods.DEFAULT_RIDGE:g}).")
@click.option("--base-instructions-weight", default=None, type=float,
              help=f"lsq: how many times each row of the base's own instructions (adapterkit_base.json) counts among "
                   f"the regularization prompts, so the merge keeps the base's own edits (default "
                   f"{merge_methods.DEFAULT_BASE_INSTRUCTIONS_WEIGHT:g} where the base records them, as builtin:tiny "
                   f"does; 0 turns it off).")
@click.option("--reg-prompts", default=None, type=click.Path(dir_okay=False),
              help="Regularization prompts, one per line (default: the built-in set of edit instructions and captions).")
@click.option("--positions", default="auto", show_default=True, type=click.Choice(merge_methods.POSITIONS),
              help="lsq target tokens: 1..first EOS (eos, the paper's); those plus each instruction's padding block "
                   "by its top 3 principal directions (eos+padding); all 77 positions (all). auto: eos+padding when "
                   "every source was trained with --kv-preservation, else eos.")
@click.option("--reg-positions", default="all", show_default=True, type=click.Choice(merge_methods.REG_POSITIONS),
              help="lsq regularization tokens: all 77 positions, or 1..first EOS (the paper's code; see README).")
@click.option("--shared-rows", default="mean", show_default=True, type=click.Choice(merge_methods.SHARED_ROWS),
              help="lsq rows several tasks share: mean target (order free), or the first task's (the paper's code; order-dependent).")
@click.option("--probe-instructions", default=None, type=click.Path(dir_okay=False),
              help="File of 'task: phrasing' lines never stored; the report scores each task's retention on them.")
@click.option("--other-modules", default="linear", show_default=True, type=click.Choice(merge_methods.OTHER_MODULE_METHODS),
              help="lsq: how LoRA modules outside attn2 K/V are merged (least squares does not apply to them).")
@click.option("--prior", default="base", show_default=True, type=click.Choice(merge_methods.PRIORS),
              help="lsq: what K/V stay near where the instructions' rows say nothing: the base's (the paper), or the "
                   "sources' average (keeps more of each task, changes the base's other edits as much as --method linear).")
@click.option("--max-rows", default=None, type=click.IntRange(1),
              help="lsq: most constraint rows solved exactly; more are replaced by their top principal combinations "
                   "(default: 3/8 of the text width, 96 on builtin:tiny, 288 on SD1.5; a number >= the rows keeps "
                   "every row, as the paper).")
@click.option("--as-lora", is_flag=True, help="Write a LoRA (the lsq update exactly, at rank = constraint rows, or --max-rows when they exceed it) instead of full K/V.")
@click.option("--task", default=None, help="Task name of the merged adapter (default: the sources' names joined by '+').")
@click.option("--fuse", is_flag=True, help="Also write a full diffusers pipeline with the merge baked in (needs --output-pipeline).")
@click.option("--output-pipeline", default=None, type=click.Path(file_okay=False), help="Folder for a full diffusers pipeline with the merge baked in (implies --fuse).")
@click.option("--force", is_flag=True, help="Merge adapters made for another base fingerprint (shapes must still match).")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of another task or method (a source, say) already in --output, "
              "or what --output-pipeline holds if it is not an earlier fused pipeline (the base itself, say).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge_command(adapters, weights, fuse, output_pipeline, **options):
    """Merge task adapters made on one base into one adapter: least squares on K/V, or a baseline."""
    from .merge import merge

    if fuse and not output_pipeline:  # --output-pipeline alone implies --fuse
        raise AdapterkitError("--fuse needs --output-pipeline DIR: the folder for the fused pipeline")
    try:
        weight_list = [float(w) for w in weights.split(",")] if weights else None
    except ValueError as e:
        raise AdapterkitError(f"--weights must be comma-separated numbers, got '{weights}'") from e
    result = merge(list(adapters), weights=weight_list, output_pipeline=output_pipeline, **options)
    click.echo(result.table)
    click.echo(f"merged adapter -> {result.path}" + (f"; fused pipeline -> {result.pipeline_path}" if result.pipeline_path else ""))


# --- demo-data command (issue 6) ---
@main.command("demo-data", short_help="Write a procedural task as a dataset folder.")
@click.option("--task", "tasks", required=True, multiple=True,
              help="Procedural task: derain, cartoonize, denoise, lowlight (held out from builtin:tiny) or a general "
                   "edit (brighter, darker, contrast, grayscale, hue, invert, posterize, sepia, saturate, warmer, blur, "
                   "sharpen, smooth, median, outline, pixelate). "
                   "Repeat it to write several tasks into one folder (--rows rows of each).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Dataset folder to write (imagefolder + metadata.jsonl).")
@click.option("--rows", default=200, show_default=True, type=int, help="Number of (input, instruction, target) rows per task.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of crops, degradations and phrasings.")
@click.option("--resolution", default=64, show_default=True, type=int, help="Side of the square images (multiple of 8).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "eval"]),
              help="train or eval: crops from disjoint source photographs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def demo_data_command(tasks, output, rows, seed, resolution, split, quiet):
    """Write a procedural task as a dataset folder that `adapterkit train --data` reads."""
    from .demo.tasks import write_task_dataset

    click.echo(write_task_dataset(tasks[0] if len(tasks) == 1 else list(tasks), output, n=rows, seed=seed, resolution=resolution, split=split, quiet=quiet))


# --- train command (issue 3) ---
class _SectionedCommand(click.Command):
    """--help lists options under the section each TrainConfig field names (required, data, adapter, ...)."""

    def format_options(self, ctx, formatter):
        from .train.config import FIELDS

        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                group = FIELDS[param.name].metadata["group"] if param.name in FIELDS else "general"
                sections.setdefault(group, []).append(record)
        for group, records in sections.items():
            with formatter.section(f"{group.capitalize()} options"):
                formatter.write_dl(records)


def _train_options(f):
    """One flag per TrainConfig field; every default is None ("not given") so a --config file is only overridden by flags given."""
    import types
    import typing

    from .train.config import FIELDS, HINTS

    for name, field_ in reversed(list(FIELDS.items())):
        meta, hint = field_.metadata, HINTS[name]
        flag = "--" + (meta["flag"] or name).replace("_", "-")
        # Unwrap only Optional[X] / X | None: tuple[str, ...] has args too, but is itself the kind (repeatable flag).
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] if union else [hint]
        shown = "required" if meta["group"] == "required" else (f"default: {field_.default}" if field_.default not in (None, ()) else "")
        help_text = meta["help"] + (f" [{shown}]" if shown else "")
        if kinds[0] is bool:
            f = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(f)
        elif typing.get_origin(kinds[0]) is tuple:
            f = click.option(flag, name, multiple=True, help=help_text)(f)
        else:
            choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            kind = click.Choice(choices) if choices else kinds[0]
            f = click.option(flag, name, type=kind, default=None, help=help_text)(f)
    return f


@main.command("train", cls=_SectionedCommand, short_help="Train one task adapter (Custom Diffusion or LoRA).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of settings (keys: the option names with underscores); flags override it.")
@_train_options
def train_command(config_file, **flags):
    """Train one task adapter (Custom Diffusion K/V or LoRA) on an edit dataset; write it to --output.

    Multi-process: `accelerate launch --num_processes N $(which adapterkit) train ...` or
    `torchrun --nproc_per_node N --no-python adapterkit train ...`.
    """
    from .data import check_path_exists
    from .train.config import TrainConfig

    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    cfg = TrainConfig.from_sources(config_file, given)
    check_path_exists(cfg.data)  # before torch loads: a mistyped --data fails in a fraction of a second
    from .train import train
    from .train.loop import TrainingInterrupted

    try:
        adapter = train(cfg)
    except TrainingInterrupted as e:
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    final, rows = adapter.training.get("final_loss"), adapter.training["rows"]
    click.echo(f"{adapter.method} adapter '{adapter.task}' -> {adapter.path}" + (f" (final loss {final:.4f})" if final is not None else ""))
    click.echo(f"rows: {rows['training']} for training ({rows['skipped']} skipped as unreadable), {rows['held_out']} held "
               f"out for validation, of {rows['in_data']} in the data")


# --- demo command (issue 6) ---
@main.command("demo", short_help="Train, merge and judge two adapters (minutes).")
@click.option("--output", default="adapterkit-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for datasets, adapters, merges, report.html, report.json, grids/ and demo.json (relative to "
                   "the current folder; the checkout's .gitignore ignores the default).")
@click.option("--base", default="builtin:tiny", show_default=True, help="Base to run on (the bundled tiny base by default).")
@click.option("--train-steps", default=None, type=click.IntRange(1), help="Optimizer steps per adapter (default: what the base recommends to `adapterkit train`; builtin:tiny: 150).")
@click.option("--merge-prior", default="base", show_default=True, type=click.Choice(merge_methods.PRIORS),
              help="What the lsq merge keeps off its constraints: the base's K/V (the paper, `adapterkit merge`'s "
                   "default) or the two adapters' average (`merge --prior average`: keeps more of each task, changes "
                   "the base's other edits as averaging does).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_command(output, base, train_steps, merge_prior, quiet):
    """Train derain + cartoonize adapters on the bundled base, merge them, evaluate, hot-swap and route: ~minutes on CPU."""
    from .demo.run import DemoSettings, format_summary, run_demo

    defaults = DemoSettings()
    settings = DemoSettings(base=base, train_steps=train_steps or defaults.train_steps, merge_prior=merge_prior)
    click.echo(f"demo: writing to {os.path.abspath(output)}")
    click.echo(format_summary(run_demo(output, settings, quiet=quiet)))


# --- serve command (issue 14) ---
@main.command("serve", short_help="Serve edits over HTTP, adapters hot-swapped.")
@click.option("--base", required=True, help=BASE_HELP)
@click.option("--adapter", "adapters", multiple=True, type=click.Path(file_okay=False, exists=True), help="Adapter folder to serve (repeatable).")
@click.option("--adapter-dir", default=None, type=click.Path(file_okay=False), help="Folder of adapter folders: all are served, and POST/DELETE /v1/adapters/NAME load or drop them at run time.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Most requests edited in one pipeline call.")
@click.option("--batch-wait-ms", default=20.0, show_default=True, type=click.FloatRange(0), help="How long a request waits for others to join its batch.")
@click.option("--queue", default=64, show_default=True, type=click.IntRange(1), help="Most waiting requests; more get 503 with Retry-After.")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Seconds a request may take (queue + compute); then 504.")
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Largest request body; larger ones get 413.")
@with_options(device_options)
@click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet (after sizing the LoRA slot, so swaps do not recompile).")
@click.option("--force", is_flag=True, help="Load adapters made for another base fingerprint (shapes must still match).")
def serve_command(base, adapters, adapter_dir, host, port, device, dtype, compile_unet, force, **limits):
    """Serve a base and its adapters over HTTP: POST /v1/edit, a web page at /, /metrics, /docs. Needs the [serve] extra."""
    from .demo.samples import sample_pngs
    from .serve.run import serve
    from .serve.settings import ServeSettings

    serve(base, list(adapters), adapter_dir, host=host, port=port, settings=ServeSettings(**limits), device=device,
          dtype=dtype, force=force, compile=compile_unet, samples=sample_pngs())
