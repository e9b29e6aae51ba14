"""Train a text-conditional pixel-space diffusion model from scratch on captioned images.

One GPU, a notebook cell, a laptop CPU or many GPUs:

    accelerate launch train_text_to_image.py --train_data_dir data/shapes --resolution 32 --output_dir out
    !accelerate launch train_text_to_image.py --config my_run.yaml          # Kaggle / Colab cell
    python train_text_to_image.py --dataset_name diffusers/pokemon-gpt4-captions --output_dir out
    accelerate launch --multi_gpu --num_processes 4 train_text_to_image.py ...

Resume an interrupted run with the same command plus `--resume_from_checkpoint latest`. Every run writes
OUTPUT_DIR/run_config.yaml, its flags as it resolved them: `--config OUTPUT_DIR/run_config.yaml --output_dir
ANOTHER_DIR` repeats it, and `--dry_run` prints it and the run plan without training.
The finished `--output_dir` is a diffusers pipeline: see pipeline_text_to_image.py.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time

from text_to_image.checkpoints import StoppedDuringSetup, StopRequest, check_output_dir, finish_interrupted_export
from text_to_image.common import UserError, is_main_process
from text_to_image.config import RunConfig, parse_args
from text_to_image.evaluation import BEST_DIR
from text_to_image.outputs import push_to_hub, tracker_config
from text_to_image.run_config import RUN_CONFIG_FILE, recorded_flags, run_config_text, write_run_config
from text_to_image.setup import setup_run
from text_to_image.training import summary_line, train

logger = logging.getLogger("text_to_image")


def run_training(args: argparse.Namespace) -> int:
    config = RunConfig.from_args(args)
    output = config.output
    check_output_dir(output)
    output.output_dir.mkdir(parents=True, exist_ok=True)
    flags = recorded_flags(args)
    if is_main_process():  # before setup, so that a run that fails in it still says what it was
        write_run_config(output.output_dir, run_config_text(flags, {}, complete=False))
    stop = StopRequest(config.optim.max_train_seconds)
    stop.install()  # from here a SIGTERM/SIGINT ends the run cleanly, during setup too
    try:
        run = setup_run(config)
        run_config = run_config_text(flags, run.choices, complete=True)
        if run.accelerator.is_main_process:
            write_run_config(output.output_dir, run_config)
        if args.dry_run:
            return report_dry_run(run, run_config, output.output_dir)
        stop.start(run.state.step)
        if run.accelerator.is_main_process:
            for stale in output.output_dir.glob(".checkpoint-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            finish_interrupted_export(output.output_dir)
            if (output.output_dir / BEST_DIR).is_dir():
                finish_interrupted_export(output.output_dir / BEST_DIR)
            run.outputs.resume_log(run.state.step)
            run.accelerator.init_trackers("train_text_to_image", config=tracker_config(run.outputs.public_flags))
        logger.info("%s", run.plan)
        started = time.perf_counter()
        try:
            reason = train(run, stop, output.checkpoints_total_limit)
        finally:
            run.accelerator.end_training()
    except StoppedDuringSetup as stopped:
        if is_main_process():
            print(f"stopped by {stopped} during setup, before the first step: nothing was saved", file=sys.stderr)
        return 0
    finally:
        stop.uninstall()
    images = (run.state.step - stop.start_step) * run.trainer.images_per_step()
    if run.accelerator.is_main_process:
        print(summary_line(run, images, time.perf_counter() - started, reason), flush=True)
    if reason != "done":
        if run.accelerator.is_main_process:
            print(
                f"stopped by {reason} at step {run.state.step}; the pipeline in {output.output_dir} holds that step's weights; resume with the same command plus --resume_from_checkpoint latest",
                file=sys.stderr,
                flush=True,
            )
        return 0
    if output.push_to_hub and run.accelerator.is_main_process:
        print(f"uploaded to https://huggingface.co/{push_to_hub(output, run.state.step)}")
    return 0


def report_dry_run(run, run_config: str, output_dir) -> int:
    """--dry_run: the plan and run_config.yaml, printed by the main process; no step taken."""
    if run.accelerator.is_main_process:
        path = output_dir / RUN_CONFIG_FILE
        print(f"run plan: {run.plan}\n\n{path}:\n{run_config}", flush=True)
        print(
            f"dry run: stopped before the first step (no checkpoint, no pipeline); train it with --config {path}",
            flush=True,
        )
    return 0


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_process() else logging.WARNING,
    )
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    # accelerate logs every file of every checkpoint at INFO; our own line says where it went
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = parse_args(argv)
        return run_training(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
