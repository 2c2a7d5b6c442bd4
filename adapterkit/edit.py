"""`adapterkit edit`: edit images with a base and optional adapters, one at a time or from a jobs file.

Jobs mode loads the base once, puts every adapter in an AdapterBank and runs `--batch-size` jobs per pipeline
call (AdapterBank.edit_batch: each job with its own adapter and seed, equal to the job edited alone). A jobs file is JSON
lines: {"image": "a.png", "instruction": "derain the image", "adapter": "derain"} ("adapter" may be omitted to
route by instruction, or null for the base alone; "seed" and "output" are optional). Bad rows are reported with
their line number and skipped; good rows are still processed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .adapters import load_adapter
from .adapters.bank import AUTO, AdapterBank
from .base import load_base
from .devices import AUTO as AUTO_DEVICE
from .devices import DEFAULT_DTYPE
from .devices import describe as describe_device
from .devices import placement
from .devices import record as record_device
from .errors import AdapterkitError
from .fileio import atomic_file, write_json
from .inference import (DEFAULT_SIDE_FACTOR, MIN_EDIT_SIDE, at_input_size, fit_for_edit, largest_default_side, open_image,
                        too_small_to_edit)


@dataclass
class JobsResult:
    outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "line N: problem", in file order
    swap_count: int = 0  # adapter changes between consecutive jobs (what a one-job-per-call run swaps)
    batches: int = 0  # pipeline calls (edit_batch chunks)
    sampler: dict = field(default_factory=dict)  # steps, guidance, image_guidance used and each one's source
    device: dict = field(default_factory=dict)  # {"device": "cuda", "dtype": "float16"}: where the jobs ran


def _sampler_options(bank: AdapterBank, options: dict, log) -> tuple[dict, object]:
    """Issue 18: steps and guidance scales left unset (None or absent) take the base's recorded defaults, else the
    blog's; `log` gets the line saying which were used."""
    sampler = bank.base.sampler(*(options.pop(k, None) for k in ("steps", "guidance", "image_guidance")))
    if log is not None:
        log(sampler.describe())
    return {**options, **sampler.options()}, sampler


def check_edit_size(path: str, image, resolution: int | None) -> None:
    """One line instead of the pipeline's ValueError for an image with a side under MIN_EDIT_SIDE."""
    if too_small_to_edit(image, resolution):
        raise AdapterkitError(f"{path} is {image.width} x {image.height} pixels; images need at least {MIN_EDIT_SIDE} x "
                              f"{MIN_EDIT_SIDE}: pass --resolution (the shorter side) to scale it up")


def note_scaled_inputs(bank: AdapterBank, scaled: list[tuple[str, object, object]], log) -> bool:
    """(path, image, what the pipeline gets: `fit_for_edit`) per input: say once that images over
    `largest_default_side` (4x the base's training resolution) are edited scaled down, with the option that edits at
    another size. True when any was."""
    large = [(path, image, work) for path, image, work in scaled if work is not image]
    if large and log is not None:
        path, image, work = large[0]
        trained = bank.base.resolution
        more = f" (and {len(large) - 1} more inputs that large)" if len(large) > 1 else ""
        log(f"note: {os.path.basename(path)} is {image.width} x {image.height}{more}: edited at {work.width} x "
            f"{work.height} (shorter side {largest_default_side(trained)}, {DEFAULT_SIDE_FACTOR}x the {trained} px the "
            f"base was trained at) and resized back; --resolution N edits at shorter side N ({min(image.size)}: its "
            "own size, slower)")
    return bool(large)


def make_bank(base_name: str, adapter_dirs: list[str], force: bool = False, device: str = AUTO_DEVICE,
              dtype: str = DEFAULT_DTYPE, log=None) -> AdapterBank:
    """The base on `device` in `dtype` (devices.py: auto is the GPU when torch sees one, else the CPU) with every
    adapter folder in a bank; `log` gets the 'device: ...' line."""
    device, dtype = placement(device, dtype)  # a bad --device fails before the slow load
    base = load_base(base_name, dtype=dtype, device=device)
    bank = AdapterBank(base, force=force)
    for folder in adapter_dirs:
        bank.add(load_adapter(folder))
    if log is not None:  # once every adapter loaded: a refused one is the only line printed
        log(describe_device(device, dtype))
    return bank


def refuse_unroutable(bank: AdapterBank) -> None:
    """Routing is asked for: refuse an adapter without instructions (a folder diffusers wrote), which it never picks."""
    mute = [t for t in bank.tasks if not bank.get(t).instructions]
    if mute:  # issue 17: such adapters silently sent every image to another task or the base
        raise AdapterkitError(
            f"adapter '{mute[0]}' stores no instructions, so no instruction can route to it; pass it as "
            f"'DIR::task={mute[0]}::instruction=TEXT' or adopt it with `adapterkit import DIR --task ... --instruction ...`"
        )


def describe_route(details: dict) -> str:
    """One line for the log: where routing sent an instruction and why ('route: -> derain (score 0.64 >= threshold
    0.24)'); `edit` printed nothing, so a user could not tell an adapter's edit from the base's."""
    task = details["task"] or "base"
    if details.get("stored"):
        return f"route: -> {task} (an instruction {'the base' if task == 'base' else 'the adapter'} stores)"
    sign = ">=" if details["task"] else "<"
    return f"route: -> {task} (best score {details['score']:.2f} {sign} threshold {details['threshold']:.2f})"


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # output extension -> PIL format


def image_format(path: str, otherwise: str = "") -> str:
    """The PIL format an output path asks for; a one-line error for any other extension (`otherwise`: what else the
    path may be). Checked before any work (session 21: a single edit's --output without an extension failed after
    the base load and the edit, a jobs row's "output": "x.gif" stopped the whole run without results.json)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise AdapterkitError(f"output {path} must end in .png, .jpg or .webp{otherwise}")
    return IMAGE_FORMATS[ext]


# The files a folder given as IMAGE stands for: the usual photo formats Pillow reads.
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")  # HEIC: pillow-heif


def expand_inputs(paths) -> tuple[list[str], bool]:
    """IMAGE arguments -> image files, a folder standing for its image files (INPUT_EXTENSIONS, sorted, not its
    subfolders; session 22: `edit photos/` was click's "File 'photos' is a directory"); and whether a folder was
    given (its results then go to a folder, however many there are)."""
    files, folder_given = [], False
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        folder_given = True
        found = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if os.path.splitext(name)[1].lower() in INPUT_EXTENSIONS and not name.startswith("."))
        if not found:
            raise AdapterkitError(f"folder {path} holds no image ({', '.join(INPUT_EXTENSIONS)}); pass image files or a folder of them")
        files += found
    return files, folder_given


def check_targets(pairs: list[tuple[str, str]], overwrite: bool = False) -> None:
    """(input, output) paths: refuse, before any work, an output that is its own or another input (session 22:
    `edit photos/*.png --output photos` replaced the photographs with their edits) unless `overwrite`, and two
    inputs written to one output (a/x.png and b/x.jpg -> out/x.png: the second replaced the first's result)."""
    inputs = {os.path.realpath(source) for source, _target in pairs}
    written: dict[str, str] = {}
    for source, target in pairs:
        clash, earlier = _target_clash(target, inputs, written, overwrite)
        if clash == "written":
            raise AdapterkitError(f"{earlier} and {source} would both be written to {target}; edit them into "
                                  "separate --output folders, or rename one")
        if clash == "input":
            raise AdapterkitError(f"output {target} is an input image, which the edit would replace: choose another "
                                  "--output, or pass --overwrite to edit in place")
        written[os.path.realpath(target)] = source


def _target_clash(target: str, inputs: set[str], written: dict, overwrite: bool) -> tuple[str | None, object]:
    """The one rule of check_targets and jobs rows: ("written", who wrote it) when an earlier image or row writes
    `target` (`written`: real path -> who), ("input", None) when it is an input image and not `overwrite`, else
    (None, None). The callers word the error for their input."""
    real = os.path.realpath(target)
    if real in written:
        return "written", written[real]
    return ("input" if real in inputs and not overwrite else None), None


# Pillow's JPEG and WebP default (quality 75/80) shows blocks on edited detail; PNG is lossless and ignores it.
SAVE_QUALITY = 95


def save_image(image, path: str) -> None:
    """Write `image` atomically in the format its extension names (image_format), JPEG and WebP at SAVE_QUALITY."""
    with atomic_file(path) as f:
        image.save(f, format=image_format(path), quality=SAVE_QUALITY)


def edit(
    base: str,
    images: list[str],
    instruction: str,
    output: str,
    adapters: list[str] = (),
    force: bool = False,
    quiet: bool = False,
    log=None,
    device: str = AUTO_DEVICE,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    **options,
) -> list[str]:
    """Edit each image with `instruction`. With one adapter it is applied; with several, routed by instruction.

    `images`: files, or folders standing for their image files (expand_inputs). One image: `output` is the file
    path. Several, or a folder: `output` is a folder; each result is `<stem>.png` inside.
    `options`: steps, guidance, image_guidance (unset: the base's recorded defaults, else 20 / 7 / 1.5), seed,
    resolution; `device` / `dtype` as make_bank's; `log(line)` receives the device and sampler settings used.
    An output that is one of the inputs is refused unless `overwrite`, two inputs with one output name always.
    """
    images, several = expand_inputs(images)
    if not images:
        raise AdapterkitError("no input image given; pass one or more image paths")
    several = several or len(images) > 1
    if several and os.path.splitext(output)[1].lower() in IMAGE_FORMATS and not os.path.isdir(output):
        # issue 19: this used to create a folder named like an image file, holding every result
        raise AdapterkitError(
            f"{len(images)} input image(s) but --output {output} names one image file; pass a folder for the "
            "results (each is <input stem>.png inside), or edit one image at a time"
        )
    if not several and not os.path.isdir(output):
        targets = [output]
        image_format(output, " (or be an existing folder)")
    else:
        targets = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png") for p in images]
    check_targets(list(zip(images, targets)), overwrite)
    loaded = [open_image(p) for p in images]  # fail on a bad image before the slow base load
    for path, img in zip(images, loaded):
        check_edit_size(path, img, options.get("resolution"))
    bank = make_bank(base, list(adapters), force=force, device=device, dtype=dtype, log=log)
    options, _ = _sampler_options(bank, options, log)
    side = largest_default_side(bank.base.resolution)
    works = [fit_for_edit(img, options.get("resolution"), side) for img in loaded]
    if note_scaled_inputs(bank, list(zip(images, loaded, works)), log) and not quiet:
        bank.pipe.set_progress_bar_config(disable=False, leave=False, desc="steps")  # seconds per image: show the steps
    task = bank.tasks[0] if len(bank.tasks) == 1 else (AUTO if bank.tasks else None)
    if task == AUTO:
        refuse_unroutable(bank)
        if log:
            log(describe_route(bank.route_details(instruction)))
    for img, work, target in tqdm(list(zip(loaded, works, targets)), desc="edit", unit="image", disable=quiet):
        save_image(at_input_size(bank.edit(work, instruction, task=task, **options), img, options.get("resolution")), target)
    return targets


def read_jobs(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, row) for each good row, and 'line N: problem' for each bad one."""
    if not os.path.isfile(path):
        raise AdapterkitError(f"jobs file {path} does not exist")
    rows, errors = [], []
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: Windows editors start files with a BOM
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {number}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                errors.append(f"line {number}: expected a JSON object")
                continue
            missing = [k for k in ("image", "instruction") if not isinstance(row.get(k), str) or not row.get(k)]
            if missing:
                errors.append(f"line {number}: missing or empty field(s) {', '.join(missing)}")
                continue
            rows.append((number, row))
    return rows, errors


DEFAULT_BATCH_SIZE = 8  # jobs per pipeline call in --jobs mode; 1 is the old one-job-per-call path


def _prepare_jobs(bank, rows, jobs_dir: str, output: str, seed: int, resolution: int | None, errors: list[str],
                  overwrite: bool = False) -> list[dict]:
    """Open each row's image and resolve its task (AUTO: routed); bad rows go to `errors` as 'line N: problem'
    (an output that is an input image, or that an earlier row writes: `_target_clash`)."""
    prepared, written, side = [], {}, largest_default_side(bank.base.resolution)
    inputs = {os.path.realpath(_job_image(jobs_dir, row)) for _number, row in rows}
    for number, row in rows:
        image_path = _job_image(jobs_dir, row)
        task = row.get("adapter", AUTO)
        try:
            if task not in (AUTO, None) and task not in bank:
                raise AdapterkitError(f"unknown adapter '{task}' (loaded: {', '.join(bank.tasks) or 'none'})")
            image = open_image(image_path)
            check_edit_size(row["image"], image, resolution)  # alone, not failing the whole batch it would join
            row_seed = int(row["seed"]) if "seed" in row else seed
            name = row.get("output") or f"{number:05d}_{os.path.splitext(os.path.basename(row['image']))[0]}.png"
            image_format(str(name))  # a bad extension skips the row here, not the whole run at save time
            target = os.path.join(output, os.path.basename(name))
            clash, earlier = _target_clash(target, inputs, written, overwrite)
            if clash == "written":
                raise AdapterkitError(f'output {target} is line {earlier}\'s as well; give the row another "output" name')
            if clash == "input":
                raise AdapterkitError(f'output {target} is an input image, which the edit would replace; give the row '
                                      'another "output" name, or pass --overwrite')
        except (AdapterkitError, ValueError, TypeError) as e:
            errors.append(f"line {number}: {e}")
            continue
        written[os.path.realpath(target)] = number
        prepared.append({"line": number, "row": row, "image": image, "seed": row_seed,
                         "work": fit_for_edit(image, resolution, side),
                         "task": bank.route(row["instruction"])[0] if task == AUTO else task, "target": target})
    return prepared


def _job_image(jobs_dir: str, row: dict) -> str:
    """A row's image path: absolute, or relative to the jobs file's folder."""
    return row["image"] if os.path.isabs(row["image"]) else os.path.join(jobs_dir, row["image"])


def _run_chunk(bank, chunk: list[dict], options: dict) -> list:
    """One edit_batch call for the chunk; a chunk that cannot be mixed (LoRA beyond K/V beside other tasks) runs
    one job at a time instead. Same outputs either way."""
    args = ([j["work"] for j in chunk], [j["row"]["instruction"] for j in chunk], [j["task"] for j in chunk],
            [j["seed"] for j in chunk])
    try:
        return bank.edit_batch(*args, **options)
    except AdapterkitError:
        if len(chunk) == 1:
            raise
        return [bank.edit_batch([i], [t], [k], [s], **options)[0] for i, t, k, s in zip(*args)]


def edit_jobs(
    base: str,
    jobs: str,
    output: str,
    adapters: list[str] = (),
    force: bool = False,
    quiet: bool = False,
    log=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = AUTO_DEVICE,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    **options,
) -> JobsResult:
    """Run every row of a jobs file on one loaded base, `batch_size` rows per pipeline call (AdapterBank.edit_batch:
    each row with its own adapter and seed, equal to the row edited alone).

    Outputs go to `output/<line>_<image stem>.png` (or the row's "output" name); `output/results.json` lists
    each row's outcome. Rows whose image, adapter or output is bad are reported by line number and skipped.
    """
    if batch_size < 1:
        raise AdapterkitError(f"--batch-size must be at least 1, got {batch_size}")
    rows, errors = read_jobs(jobs)
    bank = make_bank(base, list(adapters), force=force, device=device, dtype=dtype, log=log)
    if any("adapter" not in row for _number, row in rows):  # rows without "adapter" are routed
        refuse_unroutable(bank)
    options, sampler = _sampler_options(bank, options, log)
    os.makedirs(output, exist_ok=True)
    result = JobsResult(errors=errors, sampler=sampler.record(), device=record_device(bank.pipe))
    seed = int(options.pop("seed", 0))  # each job carries its seed: the row's, else --seed
    prepared = _prepare_jobs(bank, rows, os.path.dirname(os.path.abspath(jobs)), output, seed, options.get("resolution"),
                             result.errors, overwrite)
    note_scaled_inputs(bank, [(j["row"]["image"], j["image"], j["work"]) for j in prepared], log)
    records, previous = [], None
    with tqdm(total=len(prepared), desc="jobs", unit="job", disable=quiet) as bar:
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            try:
                edited = _run_chunk(bank, chunk, options)
            except (AdapterkitError, ValueError, TypeError) as e:
                result.errors.extend(f"line {j['line']}: {e}" for j in chunk)
                continue
            result.batches += 1
            for job, image in zip(chunk, edited):
                save_image(at_input_size(image, job["image"], options.get("resolution")), job["target"])
                result.swap_count += job["task"] != previous  # adapter changes in file order: swaps a one-by-one run makes
                previous = job["task"]
                result.outputs.append(job["target"])
                records.append({"line": job["line"], "image": job["row"]["image"], "instruction": job["row"]["instruction"],
                                "adapter": job["task"], "output": os.path.basename(job["target"])})
            bar.update(len(chunk))
    # File order (issue 19): rows rejected while reading the file were listed before rows that failed when edited.
    result.errors.sort(key=lambda error: int(error.split(":", 1)[0].removeprefix("line ")))
    write_json(os.path.join(output, "results.json"), {"sampler": result.sampler, "device": result.device, "done": records,
                                                       "errors": result.errors, "batches": result.batches})
    return result
