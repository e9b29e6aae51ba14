"""One optimizer step as one device function, for --cuda_graphs: captured once, replayed every step.

The eager step (training.Trainer.step) goes through accelerate, whose backward, clipping and optimizer step
consult the host (loss scaling, accumulation bookkeeping). A small UNet's step then waits on Python and kernel
launches, not on the GPU. Here the device work of one optimizer step is one function with no host sync:

- each micro-batch's forward and backward, noise and timesteps drawn inside from the device's generator;
- the gradient norm and clipping;
- AdamW on the optimizer's own state (foreach, capturable: the step count and learning rate are tensors);
- the EMA as three foreach ops weighted by a device scalar (torch has no foreach lerp by a tensor weight).

What changes from step to step is written into fixed device tensors before each call: the micro-batches
(pixels, caption embeddings, augmentation labels: HostFeed; with --data_on_device only their rows, the batch
being drawn and gathered inside: DeviceFeed), the learning rates and the EMA's weight. The host keeps
the LR schedule and the EMA's decay formula (diffusers'), so both stay what the eager step uses, and the
optimizer and EMA state stay the ones checkpoints save.

The function runs three ways: eagerly, traced whole by torch.compile (a test: no graph break, the same
weights as the eager step), and replayed from a CUDA graph (CapturedStep)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from text_to_image.batches import HostBatches
from text_to_image.common import exists
from text_to_image.data import Shard
from text_to_image.loss import DiffusionObjective, StepLoss
from text_to_image.resident import ResidentBatches

EAGER_STEPS_BEFORE_CAPTURE = 3  # PyTorch's advice: warm up on a side stream (cuBLAS handles, lazy state) first


@dataclass(frozen=True)
class StepInputs:
    """One optimizer step's micro-batches, gathered on the host and stacked: [accumulation, shard batch, ...] each."""

    pixels: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    def micro_batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.pixels[micro], self.text[micro], self.labels[micro] if exists(self.labels) else None


@dataclass(frozen=True)
class StepRows:
    """--data_on_device: one optimizer step's rows of the image table, [accumulation, shard batch], on the
    device; the step draws and gathers its micro-batches itself (resident.ResidentBatches)."""

    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)


Embed = Callable[[list[str] | torch.Tensor], torch.Tensor]  # captions -> embeddings: the conditioner's embed


class HostFeed:
    """A step's inputs when the host draws its micro-batches: drawn, embedded and stacked before the step,
    indexed inside it."""

    def __init__(self, batches: HostBatches, embed: Embed):
        self.batches, self.embed = batches, embed

    def inputs(self, micro_indices: range) -> StepInputs:
        """Drawn here on the CPU, the noise comes after all of the step's batch draws instead of between them
        (one generator): with accumulation the numbers differ from the eager step's there; on a GPU the noise
        has a generator of its own and they do not."""
        micro_batches = [self.batches.micro_batch(index) for index in micro_indices]
        labels = [labels for _, _, labels in micro_batches]
        return StepInputs(
            pixels=torch.stack([pixels for pixels, _, _ in micro_batches]),
            text=torch.stack([self.embed(captions) for _, captions, _ in micro_batches]),
            labels=torch.stack(labels) if exists(labels[0]) else None,
        )

    def micro_batch(self, inputs: StepInputs, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return inputs.micro_batch(micro)


class DeviceFeed:
    """--data_on_device: a step's inputs are its micro-batches' rows; each micro-batch is drawn and gathered
    inside the step, its batch draws before its loss draws, the eager step's order."""

    def __init__(self, batches: ResidentBatches, embed: Embed):
        self.batches, self.embed = batches, embed

    def inputs(self, micro_indices: range) -> StepRows:
        return StepRows(rows=self.batches.rows(micro_indices))

    def micro_batch(self, inputs: StepRows, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.gathered(inputs.rows[micro])

    def gathered(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """These rows' pixels, caption embeddings and augmentation labels, drawn on the device."""
        pixels, captions, labels = self.batches.gathered(rows)
        return pixels, self.embed(captions), labels


def feed_for(batches: HostBatches | ResidentBatches, embed: Embed) -> HostFeed | DeviceFeed:
    """How a step over these micro-batches gets its inputs: by where the batches are drawn."""
    return DeviceFeed(batches, embed) if isinstance(batches, ResidentBatches) else HostFeed(batches, embed)


def static_copy(inputs: StepInputs | StepRows) -> StepInputs | StepRows:
    """Fixed tensors of the inputs' shapes that a capture reads and each step overwrites."""
    return dataclasses.replace(inputs, **{name: tensor.clone() for name, tensor in tensors_of(inputs)})


def copy_into(static: StepInputs | StepRows, inputs: StepInputs | StepRows) -> None:
    for name, tensor in tensors_of(inputs):
        getattr(static, name).copy_(tensor, non_blocking=True)


def tensors_of(inputs: StepInputs | StepRows) -> list[tuple[str, torch.Tensor]]:
    fields = ((field.name, getattr(inputs, field.name)) for field in dataclasses.fields(inputs))
    return [(name, value) for name, value in fields if exists(value)]


@dataclass(frozen=True)
class StepOutputs:
    """The mean loss, the gradient norm before clipping (None when not clipping) and the loss per timestep
    bucket ([2, VALIDATION_BUCKETS]: sums, counts), on the device."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    buckets: torch.Tensor

    def clone(self) -> StepOutputs:
        """A copy a later replay does not overwrite."""
        return StepOutputs(
            loss=self.loss.clone(),
            grad_norm=self.grad_norm.clone() if exists(self.grad_norm) else None,
            buckets=self.buckets.clone(),
        )


class DeviceStep:
    """The device work of one optimizer step, on the trainer's own UNet, optimizer state and EMA."""

    def __init__(
        self,
        *,
        unet,
        noise_scheduler,
        objective: DiffusionObjective,
        shard: Shard,
        optimizer,
        ema,
        max_grad_norm: float,
        autocast_dtype: torch.dtype | None,
        feed: HostFeed | DeviceFeed,
    ):
        self.unet, self.noise_scheduler, self.objective, self.shard = unet, noise_scheduler, objective, shard
        self.feed = feed
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's
        self.ema, self.max_grad_norm, self.autocast_dtype = ema, max_grad_norm, autocast_dtype
        self.parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        self.device = self.parameters[0].device
        self.learning_rates = [self.scalar(group["lr"]) for group in self.optimizer.param_groups]
        self.ema_weight = self.scalar(0.0)
        initialize_adamw_state(self.optimizer)

    def scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float32, device=self.device)

    def set_scalars(self) -> None:
        """Host side, once per step before the call: this step's learning rates and EMA weight, as the eager
        step reads them (the LR schedule is stepped after the step; the EMA counts the step it is in)."""
        for rate, group in zip(self.learning_rates, self.optimizer.param_groups, strict=True):
            rate.fill_(group["lr"])
        if exists(self.ema):
            self.ema.optimization_step += 1
            self.ema.cur_decay_value = self.ema.get_decay(self.ema.optimization_step)
            self.ema_weight.fill_(1 - self.ema.cur_decay_value)
        self.optimizer._opt_called = True  # what the LR scheduler checks: AdamW steps in this step, before it

    def inputs(self, micro_indices: range) -> StepInputs | StepRows:
        """On the host, before the call: what the step over these micro-batches reads."""
        return self.feed.inputs(micro_indices)

    def __call__(self, inputs: StepInputs | StepRows) -> StepOutputs:
        accumulation = len(inputs)
        step_loss = StepLoss(self.unet, self.noise_scheduler, self.objective, self.shard, self.device)
        gradients = None
        for micro in range(accumulation):
            pixels, text, labels = self.feed.micro_batch(inputs, micro)
            with self.autocast():
                loss = step_loss.micro_batch(pixels, text, labels)
            # gradients as values, not .grad: nothing outside the step holds them, and a capture owns them
            micro_gradients = torch.autograd.grad(
                loss / accumulation, self.parameters, allow_unused=True, materialize_grads=True
            )  # divided as accelerate's backward divides it
            gradients = micro_gradients if gradients is None else torch._foreach_add(gradients, micro_gradients)
        grad_norm = self.clip(gradients)
        self.update_weights(gradients)
        return StepOutputs(loss=step_loss.mean(), grad_norm=grad_norm, buckets=step_loss.buckets)

    def autocast(self):
        # cached casts would outlive a graph capture: PyTorch's CUDA graph notes ask for cache_enabled=False
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=exists(self.autocast_dtype),
            cache_enabled=False,
        )

    def clip(self, gradients: list[torch.Tensor]) -> torch.Tensor | None:
        """Scale the gradients to --max_grad_norm at most, as torch.nn.utils.clip_grad_norm_ does; their norm."""
        if self.max_grad_norm <= 0:
            return None
        norm = torch.nn.utils.get_total_norm(gradients, foreach=True)
        torch._foreach_mul_(gradients, torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def update_weights(self, gradients: list[torch.Tensor]) -> None:
        from torch.optim.adamw import adamw

        gradient_of = dict(zip(map(id, self.parameters), gradients, strict=True))
        # capturable (the step count and learning rate read from device tensors) on GPUs and when traced; torch
        # runs it on no CPU eagerly, and nothing captures there
        capturable = self.device.type != "cpu" or torch.compiler.is_compiling()
        for group, rate in zip(self.optimizer.param_groups, self.learning_rates, strict=True):
            states = [self.optimizer.state[parameter] for parameter in group["params"]]
            adamw(
                group["params"],
                [gradient_of[id(parameter)] for parameter in group["params"]],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                [state["step"] for state in states],
                foreach=True,
                capturable=capturable,
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=rate if capturable else group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        if exists(self.ema):
            weights = [parameter.detach() for parameter in self.unet_parameters()]
            # diffusers' EMAModel.step: shadow -= (1 - decay) * (shadow - weights)
            differences = torch._foreach_sub(self.ema.shadow_params, weights)
            torch._foreach_mul_(differences, self.ema_weight)
            torch._foreach_sub_(self.ema.shadow_params, differences)

    def unet_parameters(self) -> list[torch.nn.Parameter]:
        unet = getattr(self.unet, "module", self.unet)
        return list(getattr(unet, "_orig_mod", unet).parameters())


def initialize_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's per-parameter state as torch.optim.AdamW makes it on its first step (a float32 step count on
    the parameter's device, as fused and capturable AdamW keep it), so that checkpoints stay interchangeable."""
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("--cuda_graphs does not run AMSGrad")
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            elif state["step"].device != parameter.device:  # a checkpoint of non-fused AdamW keeps it on the CPU
                state["step"] = state["step"].to(parameter.device, torch.float32)


def why_not_captured(config, accelerator) -> str | None:
    """Why --cuda_graphs cannot run this configuration (None: it can)."""
    from accelerate.utils import DistributedType

    reasons = [
        (accelerator.device.type != "cuda", "no CUDA device"),
        (accelerator.distributed_type == DistributedType.DEEPSPEED, "DeepSpeed steps the optimizer itself"),
        (accelerator.num_processes > 1, "more than one process (DDP's gradient all-reduce is not captured yet)"),
        (accelerator.mixed_precision == "fp16", "fp16's loss scaler skips steps on the host; use bf16"),
        (config.model.enable_xformers_memory_efficient_attention, "xformers attention is not captured; use SDPA"),
        (config.model.train_text_encoder, "--train_text_encoder trains the encoder outside the step"),
        (config.optim.ema_offload, "--ema_offload keeps the EMA in CPU memory"),
        (
            config.model.gradient_checkpointing,
            "--gradient_checkpointing reads and rewinds the GPU's random state, which a capture may not hold"
            " (PyTorch issue 162504)",
        ),
    ]
    return next((why for refused, why in reasons if refused), None)


def device_step_for(
    *,
    unet,
    noise_scheduler,
    objective: DiffusionObjective,
    optimizer,
    ema,
    max_grad_norm: float,
    mixed_precision: str,
    batches: HostBatches | ResidentBatches,
    embed: Embed,
) -> DeviceStep:
    """The DeviceStep over the trainer's UNet, objective, optimizer and EMA, fed from its micro-batches."""
    return DeviceStep(
        unet=unet,
        noise_scheduler=noise_scheduler,
        objective=objective,
        shard=batches.shard,
        optimizer=optimizer,
        ema=ema,
        max_grad_norm=max_grad_norm,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision),
        feed=feed_for(batches, embed),
    )


def device_step_of(trainer) -> DeviceStep:
    """The DeviceStep over an eager training.Trainer's parts: what the benchmark and the tests trace or time beside
    the eager step (a run with --cuda_graphs builds its own in setup)."""
    return device_step_for(
        unet=trainer.unet,
        noise_scheduler=trainer.noise_scheduler,
        objective=trainer.objective,
        optimizer=trainer.optimizer,
        ema=trainer.ema,
        max_grad_norm=trainer.max_grad_norm,
        mixed_precision=trainer.accelerator.mixed_precision,
        batches=trainer.batches,
        embed=trainer.conditioner.embed,
    )


Capture = Callable[[Callable[[], StepOutputs]], Callable[[], StepOutputs]]


def capture_cuda_graph(run: Callable[[], StepOutputs]) -> Callable[[], StepOutputs]:
    """`run` recorded as one CUDA graph (not executed now): a function that replays it and returns its
    outputs, fixed tensors that each replay overwrites."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()

    def replay() -> StepOutputs:
        graph.replay()
        return outputs

    return replay


class CapturedStep:
    """A DeviceStep replayed from one capture: the first EAGER_STEPS_BEFORE_CAPTURE steps run eagerly (on a
    side stream on a GPU, as PyTorch advises), the next is captured, and every step from then on copies its
    inputs into fixed tensors and replays."""

    def __init__(self, device_step: DeviceStep, capture: Capture | None = None):
        self.device_step, self.capture = device_step, capture or capture_cuda_graph
        self.eager_steps = 0
        self.static_inputs: StepInputs | StepRows | None = None
        self.replay: Callable[[], StepOutputs] | None = None

    def __call__(self, micro_indices: range) -> StepOutputs:
        """One optimizer step over these micro-batches."""
        inputs = self.device_step.inputs(micro_indices)
        if self.eager_steps < EAGER_STEPS_BEFORE_CAPTURE:
            self.eager_steps += 1
            self.device_step.set_scalars()
            with side_stream(self.device_step.device):
                return self.device_step(inputs)
        if not exists(self.replay):
            static = self.static_inputs = static_copy(inputs)
            self.replay = self.capture(lambda: self.device_step(static))
        copy_into(self.static_inputs, inputs)
        self.device_step.set_scalars()
        return self.replay().clone()


class side_stream:
    """Work on a fresh CUDA stream that waits for, and is waited for by, the current one (no-op off CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            self.context = torch.cuda.stream(self.stream)
            self.context.__enter__()

    def __exit__(self, *error):
        if self.cuda:
            self.context.__exit__(*error)
            torch.cuda.current_stream().wait_stream(self.stream)
        return False
