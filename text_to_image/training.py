"""The Trainer (one optimizer step), the step arithmetic, and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from text_to_image.batches import MicroBatches
from text_to_image.captured import CapturedStep
from text_to_image.checkpoints import StopRequest, TrainState, check_finite_loss, save_checkpoint
from text_to_image.common import exists, unwrap
from text_to_image.config import (
    SCHEDULES_PLANNED_BY_TIME,
    WARMUP_STABLE_DECAY,
    OptimConfig,
)
from text_to_image.evaluation import BEST_DIR, Due
from text_to_image.loss import DiffusionObjective, StepLoss, bucket_names
from text_to_image.metrics import SUMMARY
from text_to_image.models import CachedEmbeddings, LiveEncoder
from text_to_image.optimization import WarmupStableDecay, decay_start
from text_to_image.outputs import Outputs

logger = logging.getLogger(__name__)

DISK_BYTES_PER_SECOND = 100e6  # a slow notebook disk: the estimate of a save's time before one is measured
PLAN_SKIPPED_STEPS = 1  # a session's first step compiles kernels, allocates memory and fills caches: never timed
PLAN_TIMED_STEPS = 20  # a --max_train_time plan times this many steps after the skipped ones,
PLAN_TIMED_SECONDS = 30.0  # or fewer when they take this long


@dataclass(frozen=True)
class Schedule:
    """Step arithmetic in one place: micro-batches per epoch, optimizer steps, epoch flags as steps."""

    batches_per_epoch: int  # micro-batches of batch size x processes
    accumulation: int
    max_steps: int

    def epoch_of(self, step: int) -> int:
        """Epochs completed after `step` optimizer steps."""
        return step * self.accumulation // self.batches_per_epoch

    def crosses(self, step: int, every_epochs: int) -> bool:
        """True when optimizer step `step` completes a multiple of `every_epochs` epochs."""
        return self.epoch_of(step) // every_epochs > self.epoch_of(step - 1) // every_epochs


@dataclass(frozen=True, kw_only=True)
class Intervals:
    """When the loop logs, samples a grid, exports the pipeline and checkpoints, in optimizer steps."""

    schedule: Schedule
    logging_steps: int
    checkpointing_steps: int
    grid_epochs: int
    export_epochs: int
    validation_steps: int | None = None  # None: with every grid; validation and quality only when there is some
    quality_steps: int | None = None
    validates: bool = False
    measures_quality: bool = False

    def last(self, step: int) -> bool:
        return step >= self.schedule.max_steps

    def log(self, step: int) -> bool:
        return step % self.logging_steps == 0

    def grid(self, step: int) -> bool:
        return self.schedule.crosses(step, self.grid_epochs) or self.last(step)

    def export(self, step: int) -> bool:
        return self.schedule.crosses(step, self.export_epochs) or self.last(step)

    def checkpoint(self, step: int) -> bool:
        return step % self.checkpointing_steps == 0 or self.last(step)

    def every(self, step: int, steps: int | None) -> bool:
        return self.grid(step) if not exists(steps) else step % steps == 0 or self.last(step)

    def due(self, step: int) -> Due:
        return Due(
            grid=self.grid(step),
            validation=self.validates and self.every(step, self.validation_steps),
            quality=self.measures_quality and self.every(step, self.quality_steps),
        )

    def steps_between(self) -> dict[str, float]:
        """Optimizer steps between two checkpoints, two evaluations (grid, validation or quality) and two exports."""
        steps_per_epoch = self.schedule.batches_per_epoch / self.schedule.accumulation
        evaluations = [self.grid_epochs * steps_per_epoch]
        evaluations += [self.validation_steps] if self.validates and exists(self.validation_steps) else []
        evaluations += [self.quality_steps] if self.measures_quality and exists(self.quality_steps) else []
        return {
            "checkpoint": self.checkpointing_steps,
            "grid": min(evaluations),
            "export": self.export_epochs * steps_per_epoch,
        }


# ---------------------------------------------------------------------------------------------
# The run's length: the flags' step count, or planned from --max_train_time after timing the first steps


@dataclass(frozen=True, kw_only=True)
class LengthPlan:
    """The run's length in optimizer steps and where a warmup_stable_decay rate starts decaying (None: no decay to
    place), with where they came from. A length planned from --max_train_time is saved as TrainState.plan."""

    steps: int
    decay_start: int | None = None
    how: str = ""


def planned_steps(
    *, step: int, seconds_left: float, step_seconds: float, final_seconds: float, periodic_seconds_per_step: float
) -> int:
    """The step the time left reaches from `step`: each step at its measured time plus its share of the periodic
    checkpoints, grids and exports, and the final checkpoint, grid and export kept out of the time left."""
    usable = seconds_left - final_seconds
    return step + max(0, math.floor(usable / (step_seconds + periodic_seconds_per_step)))


def starting_length(optim: OptimConfig, state: TrainState, bound: int) -> tuple[LengthPlan, bool]:
    """The length the run starts with, and whether this session times its first steps to plan it anew.

    `bound` is --max_train_steps, else --num_epochs' count. With --max_train_time and no --max_train_steps, a
    schedule of SCHEDULES_PLANNED_BY_TIME is planned from this session's time left: anew while the saved plan's
    decay has not begun (a resumed session brings a budget of its own), kept once it has (the decay ends where it
    was planned to). Without --max_train_time a saved plan is kept: the resumed run continues its schedule
    exactly. When the flags set the length, a saved plan is dropped from `state`.
    """
    share = optim.lr_decay_share if optim.lr_scheduler == WARMUP_STABLE_DECAY else None
    flags = LengthPlan(steps=bound, decay_start=decay_start(bound, share) if exists(share) else None)
    if exists(optim.max_train_steps) or optim.lr_scheduler not in SCHEDULES_PLANNED_BY_TIME:
        state.plan = None
        return flags, False
    current = LengthPlan(**state.plan) if exists(state.plan) else flags
    decaying = exists(current.decay_start) and state.step >= current.decay_start
    return current, exists(optim.max_train_time) and not decaying


@dataclass(kw_only=True)
class TimePlanner:
    """Times the steps after a session's first ones and fixes the run's length from them, once.

    Until then the run follows `provisional` (the saved plan, or --num_epochs' count), whose decay has not begun;
    timing ends by its `decay_start`, so every step taken had the rate the fixed plan gives it.
    """

    budget: str  # --max_train_time as given
    bound: int  # the most steps: --num_epochs' count
    provisional: LengthPlan
    decay_share: float | None  # warmup_stable_decay: the share of the planned steps the rate decays over
    factor: WarmupStableDecay | None  # that schedule's factor, given the plan when it is fixed
    first_step: int  # timing starts after this step
    opened: tuple[float, float] | None = None  # the clock and the seconds spent saving and sampling then
    plan: LengthPlan | None = None

    def last_step(self) -> int:
        """The step timing ends at, unless PLAN_TIMED_SECONDS pass first: by the provisional decay's start."""
        last = self.first_step + PLAN_TIMED_STEPS
        return min(last, self.provisional.decay_start) if exists(self.provisional.decay_start) else last

    def closes(self, step: int, seconds: float) -> bool:
        return step >= self.last_step() or seconds >= PLAN_TIMED_SECONDS

    def fix(
        self, step: int, *, seconds_left: float, step_seconds: float, stop_seconds: float, periodic: float
    ) -> LengthPlan:
        """The length planned at `step` from the timed steps (NaN step_seconds: none were timed), set in the
        schedule's factor. `stop_seconds` is the final checkpoint, grid and export; `periodic` the periodic
        ones' seconds per step."""
        if math.isnan(step_seconds):
            kept = "kept: its decay begins before a step of this session could be timed"
            plan = dataclasses.replace(self.provisional, how="; ".join(filter(None, (self.provisional.how, kept))))
        else:
            allowed = planned_steps(
                step=step,
                seconds_left=seconds_left,
                step_seconds=step_seconds,
                final_seconds=stop_seconds,
                periodic_seconds_per_step=periodic,
            )
            steps = max(step, min(allowed, self.bound))
            start = decay_start(steps, self.decay_share, earliest=step) if exists(self.decay_share) else None
            timed = f"at {step_seconds:.3g} s/step, timed over steps {self.first_step + 1}-{step}"
            if allowed <= self.bound:
                how = (
                    f"~{allowed - step} more in the {format_duration(seconds_left)} left of --max_train_time {self.budget} {timed};"
                    f" {stop_seconds:.0f} s kept for the final checkpoint, grid and export, {periodic * (allowed - step):.0f} s for the periodic ones"
                )
            else:
                how = f"--num_epochs' count; --max_train_time {self.budget} would allow ~{allowed} {timed}"
            plan = LengthPlan(steps=steps, decay_start=start, how=how)
        if exists(self.factor):
            self.factor.total_steps, self.factor.decay_start = plan.steps, plan.decay_start
        self.plan = plan
        return plan


class Trainer:
    """One optimizer step at a time: micro-batches in; weights, learning rate and EMA out."""

    def __init__(
        self,
        *,
        accelerator,
        unet,
        text_encoder,
        trains_text_encoder: bool,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        ema,
        ema_offload: bool,
        batches: MicroBatches,
        conditioner: CachedEmbeddings | LiveEncoder,
        objective: DiffusionObjective,
        max_grad_norm: float,
        captured: CapturedStep | None = None,
    ):
        self.accelerator, self.unet, self.text_encoder = accelerator, unet, text_encoder
        self.trained = (unet, text_encoder) if trains_text_encoder else (unet,)
        self.noise_scheduler, self.optimizer, self.lr_scheduler = noise_scheduler, optimizer, lr_scheduler
        self.ema, self.ema_offload = ema, ema_offload
        self.batches, self.conditioner = batches, conditioner  # batches: drawn on the host or the device
        self.objective, self.max_grad_norm = objective, max_grad_norm
        self.shard = batches.shard
        self.accumulation = accelerator.gradient_accumulation_steps
        self.captured = captured  # --cuda_graphs: the step replayed from one capture

    def micro_indices(self, step: int) -> range:
        """The micro-batches of optimizer step `step` + 1."""
        return range(step * self.accumulation, (step + 1) * self.accumulation)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Optimizer step `step` + 1: its micro-batches forward and backward, clip, update, LR and EMA.
        Returns the mean loss, the gradient norm (None when not clipping) and the loss per timestep bucket
        ([2, VALIDATION_BUCKETS]: sums, counts), all on the device: no sync."""
        if exists(self.captured):
            return self.captured_step(step)
        accelerator, grad_norm = self.accelerator, None
        step_loss = StepLoss(self.unet, self.noise_scheduler, self.objective, self.shard, accelerator.device)
        for micro_index in self.micro_indices(step):
            pixels, captions, labels = self.batches.micro_batch(micro_index)
            with accelerator.accumulate(*self.trained):
                with accelerator.autocast():
                    loss = step_loss.micro_batch(pixels, self.conditioner.embed(captions), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.max_grad_norm > 0:
                    parameters = [parameter for model in self.trained for parameter in model.parameters()]
                    grad_norm = accelerator.clip_grad_norm_(parameters, self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.update_ema()
        return step_loss.mean(), grad_norm, step_loss.buckets

    def captured_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The same step through captured.CapturedStep: the host makes the step's inputs (the micro-batches, or
        with --data_on_device only their rows), the device does the rest in one replay."""
        outputs = self.captured(self.micro_indices(step))
        self.accelerator.step += self.accumulation  # accelerate's micro-step count, as accumulate() keeps it
        self.lr_scheduler.step()
        return outputs.loss, outputs.grad_norm, outputs.buckets

    def update_ema(self) -> None:
        if not exists(self.ema):
            return
        if self.ema_offload:
            self.ema.to(self.accelerator.device, non_blocking=True)
        self.ema.step(unwrap(self.accelerator, self.unet).parameters())
        if self.ema_offload:
            self.ema.to("cpu", non_blocking=True)

    def images_per_step(self) -> int:
        return self.shard.total * self.accumulation


@dataclass(kw_only=True)
class Run:
    """A run ready to train: the trainer, what it writes, when, and the loop state."""

    accelerator: object
    trainer: Trainer
    outputs: Outputs
    intervals: Intervals
    state: TrainState
    text_max_length: int
    plan: str  # the run plan, logged once
    length: LengthPlan  # the steps the run trains and where its rate decays: intervals.schedule.max_steps once fixed
    planner: TimePlanner | None = None  # --max_train_time without --max_train_steps: times the first steps, plans
    choices: dict = field(default_factory=dict)  # the flags the run chose itself (run_config.Choice by name)


@dataclass
class Meter:
    """Loss and throughput between log lines; .item() only here, once per logging interval.

    The loss is averaged over all processes (`mean_over_processes`) before it is logged or checked,
    so every process sees a NaN any one of them had and all stop together, at the same step, rather
    than one aborting while the others wait in a collective until a timeout.
    """

    mean_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
    num_train_timesteps: int = 1000
    loss_sum: torch.Tensor | None = None
    bucket_sums: torch.Tensor | None = None  # [2, VALIDATION_BUCKETS]: loss sums and counts per timestep bucket
    steps: int = 0
    images: int = 0
    since_step: int = 0
    since_time: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, images: int, buckets: torch.Tensor | None = None) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        if exists(buckets):
            self.bucket_sums = buckets if self.bucket_sums is None else self.bucket_sums + buckets
        self.steps += 1
        self.images += images

    def check_finite(self, step: int, output_dir: Path) -> torch.Tensor | None:
        """The loss summed since the last log line, averaged over processes; an error if it is NaN/inf anywhere."""
        if not exists(self.loss_sum):
            return None
        loss_sum = self.mean_over_processes(self.loss_sum)
        check_finite_loss(loss_sum, step, self.since_step, output_dir)
        return loss_sum

    def flush(self, step: int, output_dir: Path) -> dict:
        loss_sum = self.check_finite(step, output_dir)
        now = time.perf_counter()
        logs = {
            "loss": loss_sum.item() / self.steps,
            "images_per_second": self.images / max(now - self.since_time, 1e-9),
        }
        if exists(self.bucket_sums):  # a mean of sums over a mean of counts: the processes' shared ratio
            sums, counts = self.mean_over_processes(self.bucket_sums).tolist()
            names = bucket_names("train", self.num_train_timesteps)
            logs |= {name: total / count for name, total, count in zip(names, sums, counts, strict=True) if count}
        self.loss_sum, self.bucket_sums, self.steps, self.images, self.since_step, self.since_time = (
            None,
            None,
            0,
            0,
            step,
            now,
        )
        return logs


def mean_over_processes(accelerator) -> Callable[[torch.Tensor], torch.Tensor]:
    if accelerator.num_processes == 1:
        return lambda tensor: tensor
    return lambda tensor: accelerator.reduce(tensor.detach().clone(), reduction="mean")


def log_step(run: Run, meter: Meter, grad_norm, progress) -> None:
    trainer = run.trainer
    logs = meter.flush(run.state.step, run.outputs.output_dir)
    rates = trainer.lr_scheduler.get_last_lr()
    logs["lr"] = rates[0]
    if len(rates) > 1:  # --text_encoder_learning_rate: the encoder's group
        logs["lr_text_encoder"] = rates[1]
    if exists(grad_norm):
        logs["grad_norm"] = float(grad_norm)
    if exists(trainer.ema):
        logs["ema_decay"] = trainer.ema.cur_decay_value or 0.0
    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    run.accelerator.log(logs, step=run.state.step)


@dataclass(kw_only=True)
class StopCost:
    """Seconds the final checkpoint, grid and export take: as last measured, estimated before they first ran."""

    model_bytes: int
    grid_passes_per_step: float  # grid UNet passes over training passes (forward + backward ~ 3) in one step
    measured: dict[str, float] = field(default_factory=dict)
    spent: float = 0.0  # seconds in all timed saves and grids so far: not step time

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.measured[kind] = time.monotonic() - started
        self.spent += self.measured[kind]

    def each(self, step_seconds: float) -> dict[str, float]:
        estimate = {
            "checkpoint": 4 * self.model_bytes / DISK_BYTES_PER_SECOND,  # weights, two Adam moments, EMA
            "grid": step_seconds * self.grid_passes_per_step,
            "export": 2 * self.model_bytes / DISK_BYTES_PER_SECOND,  # UNet and text encoder, roughly
        }
        return {kind: self.measured.get(kind, guess) for kind, guess in estimate.items()}

    def seconds(self, step_seconds: float) -> float:
        return sum(self.each(step_seconds).values())

    def periodic(self, step_seconds: float, intervals: Intervals) -> float:
        """Seconds a step adds on average by the checkpoints, grids and exports made every so many steps."""
        between = intervals.steps_between()
        return sum(seconds / between[kind] for kind, seconds in self.each(step_seconds).items())


def stop_cost(run: Run) -> StopCost:
    grids, unet = run.outputs.grids, unwrap(run.accelerator, run.trainer.unet)
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    grid_passes = (2 if grids.guidance_scale > 1 else 1) * grids.num_inference_steps * grids.count
    return StopCost(model_bytes=model_bytes, grid_passes_per_step=grid_passes / (3 * run.trainer.images_per_step()))


def max_over_processes(accelerator, values: list[float]) -> list[float]:
    """Each value's maximum over the processes: one collective, and with one process none (nor a device sync,
    which would stop the host from queueing the next step while the device runs this one)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(torch.tensor(values, device=accelerator.device), reduction="max").tolist()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the host's clock reads the steps' end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_by_time(run: Run, stop: StopRequest, cost: StopCost, progress) -> None:
    """run.planner's timing at this step; when it ends, the length fixed, saved in the state, set in the intervals
    and logged. Several processes time their own steps and agree at each timed step (one small collective) on
    whether it ends and on the slowest step time and the shortest time left, so that all plan the same length."""
    planner, step, device = run.planner, run.state.step, run.accelerator.device
    if step < planner.first_step:
        return
    if not exists(planner.opened) and not planner.closes(step, 0.0):
        synchronize(device)
        planner.opened = (time.monotonic(), cost.spent)
        return
    seconds = math.nan
    if exists(planner.opened):
        seconds = time.monotonic() - planner.opened[0] - (cost.spent - planner.opened[1])
    agreed = [float(planner.closes(step, seconds)), seconds, -stop.seconds_left()]
    closes, seconds, seconds_left = max_over_processes(run.accelerator, agreed)
    if not closes:
        return
    synchronize(device)
    if exists(planner.opened):  # read again after the device caught up
        seconds = max(seconds, time.monotonic() - planner.opened[0] - (cost.spent - planner.opened[1]))
    step_seconds = seconds / max(1, step - planner.first_step)
    plan = planner.fix(
        step,
        seconds_left=-seconds_left,
        step_seconds=step_seconds,
        stop_seconds=cost.seconds(step_seconds),
        periodic=cost.periodic(step_seconds, run.intervals),
    )
    run.state.plan, run.length = dataclasses.asdict(plan), plan
    run.intervals = dataclasses.replace(
        run.intervals, schedule=dataclasses.replace(run.intervals.schedule, max_steps=plan.steps)
    )
    progress.total = plan.steps
    progress.refresh()
    logger.info("run length planned: %s", describe_length(plan))


def describe_length(plan: LengthPlan) -> str:
    decay = ""
    if exists(plan.decay_start):
        share = (plan.steps - plan.decay_start) / max(1, plan.steps)
        decay = f"; the learning rate decays to 0 over steps {plan.decay_start}-{plan.steps} (the last {share:.0%})"
    return f"{plan.steps} steps ({plan.how}){decay}" if plan.how else f"{plan.steps} steps{decay}"


def cut_short(length: LengthPlan, step: int, rate_share: float) -> str | None:
    """What a --max_train_time stop at `step` left of the planned learning-rate decay (None: nothing to say);
    `rate_share` is the rate there over the peak rate."""
    if not exists(length.decay_start) or step >= length.steps:
        return None
    where = f"stopped by --max_train_time at step {step} of the {length.steps} planned"
    if step < length.decay_start:
        return f"{where}: the learning-rate decay (from step {length.decay_start}) never began"
    return f"{where}: the learning-rate decay from step {length.decay_start} was cut short at {rate_share:.0%} of the peak rate"


def rate_share(lr_scheduler) -> float:
    """The learning rate the next step takes, over the peak rate."""
    return lr_scheduler.get_last_lr()[0] / lr_scheduler.base_lrs[0]


def format_duration(seconds: float) -> str:
    """8h05m, 12m30s or 45s: --max_train_time's spelling."""
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}h{minute:02d}m" if hours else f"{minute}m{second:02d}s" if minute else f"{second}s"


def train(run: Run, stop: StopRequest, checkpoints_total_limit: int | None) -> str:
    """The loop. Returns why it ended: 'done' or the stop reason."""
    from tqdm.auto import tqdm

    trainer, outputs, intervals, state = run.trainer, run.outputs, run.intervals, run.state
    output_dir = outputs.output_dir
    meter = Meter(
        mean_over_processes=mean_over_processes(run.accelerator),
        num_train_timesteps=trainer.noise_scheduler.config.num_train_timesteps,
        since_step=state.step,
    )
    grad_norm, grid = None, None
    cost, started, start_step = stop_cost(run), time.monotonic(), state.step
    progress = tqdm(
        total=intervals.schedule.max_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not run.accelerator.is_local_main_process,
    )
    trainer.unet.train()
    if exists(trainer.text_encoder):
        trainer.text_encoder.train(len(trainer.trained) > 1)
    while state.step < intervals.schedule.max_steps:
        loss, norm, buckets = trainer.step(state.step)
        state.step += 1
        meter.add(loss, trainer.images_per_step(), buckets)
        grad_norm = norm if exists(norm) else grad_norm
        progress.update(1)
        if exists(run.planner) and not exists(run.planner.plan):
            plan_by_time(run, stop, cost, progress)  # before the intervals: a plan may end the run at this step
            intervals = run.intervals
        if intervals.log(state.step):
            log_step(run, meter, grad_norm, progress)
        if due := intervals.due(state.step):
            with cost.timed("grid"):
                grid = outputs.evaluate(state, intervals.schedule.epoch_of(state.step), due) or grid
        if intervals.export(state.step):
            meter.check_finite(state.step, output_dir)
            with cost.timed("export"):
                outputs.export(state, grid)
        stop.reserve = cost.seconds((time.monotonic() - started) / (state.step - start_step))
        stopping = stop.requested(run.accelerator, state.step)
        if intervals.checkpoint(state.step) or stopping:
            meter.check_finite(state.step, output_dir)
            with cost.timed("checkpoint"):
                path = save_checkpoint(run.accelerator, output_dir, state, checkpoints_total_limit)
            logger.info("saved checkpoint %s", path)
        if stopping:
            progress.close()
            if not stop.by_signal and (short := cut_short(run.length, state.step, rate_share(trainer.lr_scheduler))):
                logger.warning("%s", short)
            if not intervals.last(state.step):  # the last step has exported already
                if not stop.by_signal:  # a preemption's grace period may be short: no last grid then
                    due = Due(grid=True, validation=intervals.validates)
                    grid = outputs.evaluate(state, intervals.schedule.epoch_of(state.step), due)
                outputs.export(state, grid)
            return stop.reason
    progress.close()
    return "done"


def summary_line(run: Run, images: int, seconds: float, reason: str) -> str:
    rate = images / max(seconds, 1e-9)
    skipped = run.trainer.batches.source.skipped
    skipped = f", skipped {skipped} unreadable images" if skipped else ""
    line = f"{'finished' if reason == 'done' else 'stopped'} at step {run.state.step}/{run.intervals.schedule.max_steps}: {images} images in {seconds:.1f} s, {rate:.2f} img/s{skipped}"
    return line + evaluation_summary(run.outputs.latest, run.state.best)


def evaluation_summary(latest: dict[str, tuple[int, float]], best: dict | None) -> str:
    """'; last evaluated: val/loss 0.1 (step S), ...; best val_loss 0.09 at step T (saved in best/)'."""
    shown = [metric.logged for metric in SUMMARY if metric.logged in latest]
    if not shown:
        return ""
    text = "; last evaluated: " + ", ".join(f"{name} {latest[name][1]:.4g} (step {latest[name][0]})" for name in shown)
    if exists(best):
        text += f"; best {best['metric']} {best['value']:.4g} at step {best['step']} (saved in {BEST_DIR}/)"
    return text
