"""OUTPUT_DIR/run_config.yaml: a run you can read back and repeat.

Every flag with the value the run resolved it to: defaults filled in, and the flags a run leaves to itself (the
seed, the learning rates, where batches are drawn, the precision, the caption length) set to what it chose, each
with what chose it in a comment above it. `--config OUTPUT_DIR/run_config.yaml --output_dir OTHER` repeats the
run (a flag on the command line wins over the file), and trains the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from text_to_image.common import exists
from text_to_image.config import FLAG_GROUPS, TEXT_ENCODER_RATE_SHARE, public_flags

RUN_CONFIG_FILE = "run_config.yaml"
# how this invocation was launched, not what the run is: a run repeated from the file must not dry-run again
NOT_RECORDED = ("config", "dry_run", "local_rank")


@dataclass(frozen=True)
class Choice:
    """The value the run chose for a flag left to it, and what chose it."""

    value: object
    why: str


def recorded_flags(args: argparse.Namespace) -> dict:
    """Every flag as parsed (defaults and --config filled in), secrets and the launch's own flags left out."""
    return {name: value for name, value in public_flags(args).items() if name not in NOT_RECORDED}


def run_config_text(flags: dict, choices: dict[str, Choice], *, complete: bool) -> str:
    """The YAML of the run: flags by group, a chosen one with a comment above it saying what chose it.
    `complete`: the choices are made (after setup); before, the flags left to the run still say so (null, auto)."""
    lines = [
        f"# The flags of train_text_to_image.py's run in {flags['output_dir']}, as it resolved them.",
        f"# Repeat it: python train_text_to_image.py --config {Path(flags['output_dir']) / RUN_CONFIG_FILE}"
        " --output_dir ANOTHER_DIR",
    ]
    if not complete:
        lines.append("# Written before setup: the choices the run makes itself (seed, learning rate, ...) come after.")
    for group in FLAG_GROUPS:
        names = [item.name for item in dataclasses.fields(group) if item.name in flags]
        if not names:
            continue
        lines += ["", f"# {group._argument_group_name}"]
        for name in names:
            if name in choices:
                lines.append(f"# {name}, chosen: {choices[name].why}")
            lines.append(yaml_entry(name, choices[name].value if name in choices else flags[name]))
    return "\n".join(lines) + "\n"


def yaml_entry(name: str, value) -> str:
    import yaml

    # floats are written as repr writes them, so a chosen learning rate loads back to the same bits
    return yaml.safe_dump({name: value}, default_flow_style=False, width=math.inf, allow_unicode=True).rstrip("\n")


def write_run_config(output_dir: Path, text: str) -> Path:
    """OUTPUT_DIR/run_config.yaml, written whole or not at all (a kill mid-write leaves the previous file)."""
    path = output_dir / RUN_CONFIG_FILE
    temporary = output_dir / f".{RUN_CONFIG_FILE}.tmp"
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


# ---- what chose each value ----


def seed_choice(given: int | None, seed: int, resumed_from: Path | None) -> Choice | None:
    if exists(resumed_from):
        return Choice(seed, f"the seed of the run resumed from {resumed_from}")
    return None if exists(given) else Choice(seed, "drawn at random (no --seed)")


def learning_rate_choices(
    given: float | None, given_encoder: float | None, unet: float, encoder: float | None, why: str
) -> dict[str, Choice]:
    """The rates optimization.choose_learning_rates chose: the UNet's with its rule, the encoder's as a share of it."""
    choices = {}
    if not exists(given):
        choices["learning_rate"] = Choice(unet, why.removeprefix("chosen: "))
    if not exists(given) and not exists(given_encoder) and exists(encoder):
        choices["text_encoder_learning_rate"] = Choice(encoder, f"{TEXT_ENCODER_RATE_SHARE:g} x the chosen UNet rate")
    return choices


def precision_choice(given: str | None, resolved: str) -> Choice | None:
    """accelerate's choice when --mixed_precision is not given: its launch config's (which `accelerate launch`
    passes as ACCELERATE_MIXED_PRECISION), else none."""
    if exists(given):
        return None
    if exists(os.environ.get("ACCELERATE_MIXED_PRECISION")):
        return Choice(resolved, f"no --mixed_precision; accelerate launch's config says {resolved}")
    return Choice(resolved, "no --mixed_precision and no accelerate launch config: full precision")


def on_device_choice(
    given: str, on_device: bool, why_not: str | None, recorded: bool | None, device_type: str
) -> Choice | None:
    """--data_on_device auto's choice (resident.choose_on_device), in words."""
    if given != "auto":
        return None
    value = "yes" if on_device else "no"
    if exists(recorded) and recorded == on_device:
        return Choice(value, f"auto: as the run being resumed drew its batches ({'device' if on_device else 'host'})")
    if on_device:
        return Choice(value, "auto: a GPU, and the decoded images and caption embeddings fit on it")
    if device_type != "cuda":
        return Choice(value, "auto: no GPU, so the host draws the batches")
    return Choice(value, f"auto: {why_not}")


def caption_length_choice(given: int | None, length: int, streaming: bool) -> Choice | None:
    if exists(given):
        return None
    if streaming:
        return Choice(length, "the tokenizer's maximum (a stream's captions are not known ahead)")
    return Choice(
        length, "the longest tokenized caption shown (start and end tokens included), within the tokenizer's maximum"
    )
