"""What every module needs: the user-error type and a few one-line helpers."""

from __future__ import annotations

import os

import torch

CPU = torch.device("cpu")


class UserError(Exception):
    """A mistake in the user's flags or data: printed as one line, no traceback."""


def exists(value) -> bool:
    return value is not None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device`; from the CPU to a GPU from pinned memory without blocking, so the host runs ahead."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def unwrap(accelerator, model):
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)
