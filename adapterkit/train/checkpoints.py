"""What a training run keeps on disk, crash-safe: checkpoints (save / list / prune / resume), the train log, the
final publish into OUTPUT; and how a run stops: Ctrl-C / SIGTERM handling and multi-process teardown.

Every function takes what it needs as arguments (paths, the accelerator, callables); nothing here imports the
loop. OUTPUT holds the adapter folder's files plus these subfolders:

    OUTPUT/checkpoints/checkpoint-N/   accelerate state (every process), adapter/ (main), trainer_state.json (last)
    OUTPUT/validation/step-N.png       held-out edits (train/validation.py)
    OUTPUT/logs/train_log.jsonl        one row per optimizer step (and tracker files)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading

from ..adapters.record import Adapter, check_replaceable, save_adapter
from ..errors import AdapterkitError
from ..faults import fault_point
from ..fileio import atomic_file, atomic_folder, clean_stale, discard_folder, write_json

CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
LOGS = "logs"
TRAINING_SUBFOLDERS = (CHECKPOINTS, VALIDATION, LOGS)  # what publish keeps in OUTPUT across runs
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
# Settings a checkpoint can only be resumed with unchanged: they decide what the saved tensors are.
RESUME_MUST_MATCH = ("method", "rank", "targets", "lora_alpha")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training: a checkpoint was saved first; the message says where."""


# ==================================================================================================== output folder
def clean_stale_temporaries(output: str) -> None:
    """Delete what a killed run left half written: temporary copies of OUTPUT and of its checkpoints, logs, images."""
    clean_stale(os.path.dirname(os.path.abspath(output)), os.path.basename(os.path.abspath(output)))
    for sub in ("", *TRAINING_SUBFOLDERS):
        clean_stale(os.path.join(output, sub))


def check_output_folder(output: str, resume: str | None, training: tuple[str, str], overwrite: bool) -> None:
    """Before any work, unless resuming: OUTPUT holding checkpoints needs --resume; OUTPUT holding a finished adapter
    of another (task, method) than `training`, or files that are no adapter, needs --overwrite
    (record.check_replaceable; publish keeps the training subfolders). Rerunning the same command still replaces its
    own adapter, as diffusers' scripts do."""
    if resume:
        return
    if list_checkpoints(os.path.join(output, CHECKPOINTS)):
        raise AdapterkitError(
            f"{output} already holds checkpoints of a run; pass --resume latest to continue it, or choose another --output"
        )
    check_replaceable(output, *training, overwrite=overwrite, kept=TRAINING_SUBFOLDERS)


# ==================================================================================================== checkpoints
def checkpoint_path(output: str, step: int) -> str:
    return os.path.join(output, CHECKPOINTS, f"checkpoint-{step}")


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints, oldest first.

    A checkpoint is written in a temporary folder (its name starts with '.', so it never matches) and renamed
    into place, and pruned by renaming it away before deleting it: a `checkpoint-N` folder is always complete.
    Folders without trainer_state.json (written last) are not ours and are ignored too.
    """
    if not os.path.isdir(folder):
        return []
    found = [n for n in os.listdir(folder) if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()
             and os.path.isfile(os.path.join(folder, n, STATE_FILE))]
    return [os.path.join(folder, n) for n in sorted(found, key=lambda n: int(n.split("-", 1)[1]))]


def save_checkpoint(accelerator, output: str, step: int, current_adapter, trainer_state: dict, keep: int) -> str:
    """accelerate state (optimizer, scheduler, scaler, RNGs; every process) + adapter + trainer state, atomically.

    `current_adapter()` makes the Adapter to store (called on the main process only); `trainer_state` is written
    as trainer_state.json, last. Then all but the newest `keep` checkpoints are pruned (0: keep all).
    """
    path = checkpoint_path(output, step)
    with shared_atomic_folder(accelerator, path) as tmp:
        accelerator.save_state(tmp)
        fault_point("checkpoint.write")  # tests: SIGKILL with the temporary folder half written
        if accelerator.is_main_process:
            save_adapter(current_adapter(), os.path.join(tmp, "adapter"))
            write_json(os.path.join(tmp, STATE_FILE), {**trainer_state, "last_checkpoint": path})
    fault_point("checkpoint.saved")  # tests: SIGKILL after the rename, before older checkpoints are pruned
    if accelerator.is_main_process and keep:
        # Pruned only now that the new one is complete; hidden before deletion, so never listed half deleted.
        for old in list_checkpoints(os.path.join(output, CHECKPOINTS))[:-keep]:
            discard_folder(old)
    return path


@contextlib.contextmanager
def shared_atomic_folder(accelerator, path: str):
    """fileio.atomic_folder opened by the main process, its temporary path shared so every process writes into it."""
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(path)) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            tmp = broadcast_object_list([tmp])[0]
        yield tmp
        accelerator.wait_for_everyone()  # all files written before the main process renames the folder into place
    accelerator.wait_for_everyone()


def resolve_resume(output: str, resume: str) -> str | None:
    """The checkpoint folder `--resume` names ("latest": the newest complete one, None when there is none)."""
    if resume == "latest":
        found = list_checkpoints(os.path.join(output, CHECKPOINTS))
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise AdapterkitError(f"--resume {resume} is not a checkpoint folder (no {STATE_FILE}); pass latest or a checkpoint-N folder")
    return resume


def read_checkpoint(path: str, config: dict, say) -> dict:
    """trainer_state.json of a checkpoint, refused when it was made with other adapter settings than `config`
    (a resolved TrainConfig dict); other changed settings are reported through `say`."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    saved_config = saved.get("config", {})
    for key in RESUME_MUST_MATCH:
        if saved_config.get(key) != config[key]:
            raise AdapterkitError(f"checkpoint {path} was made with {key}={saved_config.get(key)!r}, this run has {config[key]!r}; use the same setting to resume")
    changed = sorted(k for k, v in config.items() if k not in ("resume", "quiet") and saved_config.get(k, v) != v)
    if changed:
        say(f"resuming with changed settings: {', '.join(changed)}")
    return saved


# ==================================================================================================== train log
def append_log(output: str, row: dict) -> None:
    path = os.path.join(output, LOGS, LOG_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: str, step: int) -> None:
    """Drop log rows after `step` (all of them for a new run), so the log reads like one uninterrupted run.

    A killed run's rows past its last checkpoint go, and so does a torn last line (a crash mid-write).
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if _log_step(line) <= step]
    with atomic_file(path, "w") as f:
        f.writelines(rows)


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ==================================================================================================== publish
def publish(adapter: Adapter, output: str) -> None:
    """Write the adapter into OUTPUT in one atomic rename, keeping checkpoints/, validation/ and logs/.

    save_adapter replaces a whole folder, so the adapter is staged inside the new folder and the training
    subfolders are hard-linked in (no data copied; the old links go with the old folder).
    """
    with atomic_folder(output) as tmp:
        staged = save_adapter(adapter, os.path.join(tmp, ".adapter"))
        for name in os.listdir(staged):
            os.rename(os.path.join(staged, name), os.path.join(tmp, name))
        os.rmdir(staged)
        fault_point("publish.write")  # tests: SIGKILL with the new OUTPUT half assembled
        for sub in TRAINING_SUBFOLDERS:
            if os.path.isdir(os.path.join(output, sub)):
                shutil.copytree(os.path.join(output, sub), os.path.join(tmp, sub), copy_function=_link_or_copy)
    adapter.path = output


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ==================================================================================================== stopping
class StopSignal:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops. A second Ctrl-C quits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def release_process_group(accelerator) -> None:
    """Multi-process runs: free the DDP wrapper and destroy the process group while every process is still here.

    Left to interpreter exit, the DDP Reducer's destructor tears down the gloo process group after the first process
    has already gone, and joining gloo's threads can then block forever (seen under torchrun on 2 CPU processes:
    one rank hung in ~ProcessGroupGloo with its adapter already written). The caller drops its own references to
    the prepared model and optimizer first.
    """
    if accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops the accelerator's references to the prepared (DDP) model
    if dist.is_initialized():
        dist.destroy_process_group()
