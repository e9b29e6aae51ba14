"""Checkpoints and exports, written atomically and rotated in one place; resuming from them; and stopping
(signals, --max_train_time, a non-finite loss) at a step where everything is saved."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline_text_to_image import copy_pipeline_code
from text_to_image.common import UserError, exists, is_main_process
from text_to_image.config import OutputConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKER = "train_state.json"
PIPELINE_STAGING = ".pipeline.tmp"  # a pipeline export is written here, then swapped in
PIPELINE_RETIRED = ".pipeline.old"  # the entries it replaces, until the swap is complete


# With several processes, agreeing to stop is a collective and so a host-device sync: every few steps, not every step
STOP_CHECK_STEPS = 10


@dataclass
class TrainState:
    """Loop state saved with every checkpoint (model/optimizer/RNG are saved by accelerate)."""

    step: int = 0
    seed: int = 0
    num_processes: int = 1
    skipped_images: int = 0
    unreadable_rows: list[int] = field(default_factory=list)  # a resumed per-batch run need not check again
    torch_compile: bool | None = None  # compiled weights are saved under "_orig_mod." names (None: not recorded)
    best: dict | None = None  # --keep_best: {"metric", "value", "step"} of the pipeline in OUTPUT_DIR/best
    data_on_device: bool | None = None  # batches drawn on the device (resident.py); None: not recorded
    plan: dict | None = None  # a length planned from --max_train_time (training.LengthPlan's fields), fixed once


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    marker = path / CHECKPOINT_MARKER
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*")) or any(path.glob("model_*"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-STEP folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and exists(checkpoint_step(path))]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete or unreadable ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s (no readable %s)", path, CHECKPOINT_MARKER)
    return None


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, total_limit: int | None) -> Path:
    """Write to a hidden temporary folder, fsync, then rename: a crash never leaves a half checkpoint."""
    final = output_dir / f"checkpoint-{state.step}"
    temporary = output_dir / f".checkpoint-{state.step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / CHECKPOINT_MARKER).write_text(json.dumps(state.__dict__, indent=2))
        fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` complete checkpoints (incomplete ones go too)."""
    if not exists(total_limit):
        return
    checkpoints = list_checkpoints(output_dir)
    complete = [path for path in checkpoints if is_complete_checkpoint(path)]
    doomed = [path for path in checkpoints if path not in complete] + complete[: max(0, len(complete) - total_limit)]
    for path in doomed:
        logger.info("removing old checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume_checkpoint(requested: str | None, output_dir: Path) -> Path | None:
    if not exists(requested):
        return None
    if requested != "latest":
        path = Path(requested)
        if not is_complete_checkpoint(path):
            raise UserError(
                f"--resume_from_checkpoint {path} is not a complete checkpoint (no readable {CHECKPOINT_MARKER}); pass another checkpoint-STEP folder or 'latest'"
            )
        return path
    latest = find_latest_checkpoint(output_dir)
    if not exists(latest):
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a fresh run", output_dir)
    return latest


def read_train_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint / CHECKPOINT_MARKER).read_text()))


def check_output_dir(output: OutputConfig) -> None:
    """Refuse to silently mix a fresh run into an earlier run's checkpoints."""
    earlier = list_checkpoints(output.output_dir)
    if not earlier or exists(output.resume_from_checkpoint):
        return
    if not output.overwrite_output_dir:
        raise UserError(
            f"--output_dir {output.output_dir} already holds checkpoints of an earlier run; add --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over, or choose another --output_dir"
        )
    if is_main_process():
        for path in earlier + [output.output_dir / "samples"]:
            shutil.rmtree(path, ignore_errors=True)


def all_finite(model) -> bool:
    return all(torch.isfinite(parameter).all() for parameter in model.parameters())


def save_pipeline(pipeline, output_dir: Path, card: str, step: int) -> None:
    """The diffusers pipeline at output_dir, its code as pipeline.py, and a model card."""
    if not all_finite(pipeline.unet):
        raise UserError(f"the UNet weights hold NaN/inf at step {step}; not overwriting the pipeline in {output_dir}")
    staging = output_dir / PIPELINE_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    copy_pipeline_code(staging)
    (staging / "README.md").write_text(card)
    fsync_tree(staging)
    swap_in_pipeline(staging, output_dir)


def swap_in_pipeline(staging: Path, output_dir: Path) -> None:
    """Move a complete pipeline from `staging` into output_dir, entry by entry (renames only, no copying).

    The slow part (writing) happened in `staging`, so a kill then leaves the previous pipeline whole.
    PIPELINE_RETIRED exists only while entries are being swapped, so it marks `staging` as complete: a kill
    between two renames is finished at the next start (finish_interrupted_export), never left mixed.
    """
    retired = output_dir / PIPELINE_RETIRED
    retired.mkdir(exist_ok=True)
    for entry in sorted(staging.iterdir()):
        current = output_dir / entry.name
        if current.exists():
            shutil.rmtree(retired / entry.name, ignore_errors=True)
            current.rename(retired / entry.name)
        entry.rename(current)
    shutil.rmtree(retired)
    staging.rmdir()


def finish_interrupted_export(output_dir: Path) -> None:
    """A complete staged pipeline is swapped in; a half-written one is dropped (the previous one stays)."""
    staging, retired = output_dir / PIPELINE_STAGING, output_dir / PIPELINE_RETIRED
    if retired.is_dir() and staging.is_dir():
        swap_in_pipeline(staging, output_dir)
        logger.warning("finished swapping in the pipeline an interrupted export had written to %s", staging)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


class StoppedDuringSetup(BaseException):
    """A SIGTERM/SIGINT before the first step (the signal's name). A BaseException, like KeyboardInterrupt:
    raised wherever the signal lands, no library's `except Exception` (logging's, for one) may swallow it."""


class StopRequest:
    """Set by SIGTERM/SIGINT or --max_train_time; the loop finishes its step (with several processes,
    up to STOP_CHECK_STEPS steps, so that all stop at the same one), checkpoints, exports and exits.

    The time limit is checked against the deadline less `reserve`, the measured (or estimated) time of
    that final checkpoint, grid and export, so the whole stop fits in --max_train_time.
    """

    def __init__(self, max_seconds: float | None):
        self.reason: str | None = None
        self.by_signal = False  # agreed by all processes: skip the final grid, a preemption may be short
        self.max_seconds, self.deadline = max_seconds, None
        self.reserve = 0.0
        self.previous = {}
        self.in_setup, self.start_step = True, 0

    def start(self, step: int) -> None:
        """Training begins at `step`: the time limit counts from now, and a signal now stops after a step."""
        self.in_setup, self.start_step = False, step
        if exists(self.max_seconds):
            self.deadline = time.monotonic() + self.max_seconds

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        if self.in_setup:  # nothing to save yet: abandon the setup where it is
            raise StoppedDuringSetup(signal.Signals(signum).name)
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.reason = signal.Signals(signum).name
        print(
            f"\n{self.reason} received: finishing this step, saving a checkpoint, then the pipeline (Ctrl-C again quits without saving)",
            file=sys.stderr,
            flush=True,
        )

    def seconds_left(self) -> float | None:
        """Seconds to the --max_train_time deadline (None without one)."""
        return self.deadline - time.monotonic() if exists(self.deadline) else None

    def requested(self, accelerator, step: int) -> bool:
        if self.reason is None and exists(self.deadline) and time.monotonic() > self.deadline - self.reserve:
            self.reason = "--max_train_time"
        signalled = self.reason is not None and self.reason != "--max_train_time"
        if accelerator.num_processes == 1:
            self.by_signal = signalled
            return self.reason is not None
        if step % STOP_CHECK_STEPS:
            return False
        # 2: a signal somewhere, 1: a time limit somewhere; the max tells every process both
        flag = torch.tensor([2.0 if signalled else float(self.reason is not None)], device=accelerator.device)
        agreed = accelerator.reduce(flag, reduction="max").item()
        if agreed and self.reason is None:
            self.reason = "another process"
        self.by_signal = agreed == 2
        return bool(agreed)


def check_finite_loss(loss_sum: torch.Tensor, step: int, since: int, output_dir: Path) -> None:
    if torch.isfinite(loss_sum).all():
        return
    hint = "try a lower --learning_rate, bf16 instead of fp16, or --max_grad_norm 1"
    raise UserError(
        f"loss became NaN/inf between steps {since} and {step}; {hint}. Nothing was saved from this point; resume from the last checkpoint in {output_dir}"
    )
