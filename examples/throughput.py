"""Throughput of the trainer's own step: img/s, MFU, kernels per step and host against GPU ms, per row.

    python examples/throughput.py --output throughput.md               # on a GPU: bf16, rows until --budget_s
    python examples/throughput.py --cpu --output /tmp/throughput.md    # a dry run on the CPU (CI): tiny sizes

A row is one (--model_size, resolution, batch, mode) run, built by the trainer's own setup
(benchmark.set_up_training, i.e. setup.setup_run) with the mode's flags (eager: none, compile: --torch_compile,
graphed: --cuda_graphs, compile + graphed: both) and --mixed_precision bf16, and stepped by its own
Trainer.step. After warm-up steps (compile happens on the first, the CUDA graph is captured on the fourth),
K steps are timed between two synchronisations: img/s and wall ms come from that window, host ms from the time
spent inside the step calls. A short torch.profiler window (CUDA activity) then counts the kernels of a step
and sums their device time (GPU ms); the CPU dry run counts dispatched ops (benchmark.OpCounter) instead. MFU
is img/s times the UNet's training FLOPs per image (benchmark.training_flops_per_image) over the card's dense
bf16 peak (benchmark.gpu_peak_flops). Each row is its own run with a static batch: compile sees one shape.

Beside the table: the trainer's own images_per_second (train_text_to_image.py logging every 50 steps to
tensorboard, read back at steps 100 and 150) for eager and graphed at 32 px and batch 128, per preset, and its
ratio to the table's img/s at the same settings.

The whole grid (4 presets x 2 resolutions x 4 batches x 4 modes, compile rows slow to compile) does not fit in
minutes, so jobs run most useful first -- every preset eager and graphed at 32 px and batch 128, the trainer's
figures, the other batches, the compile modes, then 64 px -- and a row whose expected time no longer fits in
--budget_s is listed as "skipped: time budget". A row that runs out of GPU memory says so and the next goes on.
The table is rewritten after every job, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import benchmark
import gpu_check

PRESETS = ("tiny", "small", "base", "large")
MODES = {
    "eager": (),
    "compile": ("--torch_compile",),
    "graphed": ("--cuda_graphs",),
    "compile + graphed": ("--torch_compile", "--cuda_graphs"),
}
FAST_MODES, COMPILED_MODES = ("eager", "graphed"), ("compile", "compile + graphed")
WITHIN = 0.15  # the bar for the trainer's own figure against the table's
# a row's expected seconds before any row of its mode was measured: (on a GPU, compiles) -> seconds; the CPU
# dry run does not compile
FIRST_GUESS_S = {(True, False): 20.0, (True, True): 150.0, (False, False): 10.0}
FIRST_TRAINER_GUESS_S = {True: 45.0, False: 15.0}
SUMMARY_PREFIX = "throughput:"  # the last line printed; gpu_check quotes it


@dataclass(frozen=True)
class Setting:
    preset: str
    resolution: int
    batch: int
    mode: str

    def work(self) -> int:
        """Pixels per step: what a step's time scales with, within a preset."""
        return self.batch * self.resolution**2

    def compiles(self) -> bool:
        return "--torch_compile" in MODES[self.mode]

    def slug(self) -> str:
        return f"{self.preset}-{self.resolution}px-b{self.batch}-{self.mode.replace(' + ', '+')}"


@dataclass(frozen=True, kw_only=True)
class Grid:
    """What this run measures and how many steps each row takes."""

    presets: tuple[str, ...]
    resolutions: tuple[int, ...]
    batches: tuple[int, ...]
    timed_steps: int
    profiled_steps: int
    precision: str  # --mixed_precision
    log_every: int  # the trainer's own runs log every N steps for 3N steps
    compared_presets: tuple[str, ...]  # the trainer's figure for these, eager and graphed, at the first px and batch

    def compared(self) -> list[Setting]:
        resolution, batch = self.resolutions[0], self.batches[0]
        return [Setting(preset, resolution, batch, mode) for preset in self.compared_presets for mode in FAST_MODES]


@dataclass(frozen=True, kw_only=True)
class Measured:
    images_per_second: float
    flops_per_image: float
    mfu: float | None  # None: the card's peak is unknown
    kernels_per_step: float | None  # on the CPU: dispatched ops; None: the profiler saw no kernels
    host_ms: float
    device_ms: float | None  # None on the CPU
    wall_ms: float
    setup_s: float
    first_steps_s: float  # the warm-up's time beyond its steps: compiling, capturing
    note: str = ""


@dataclass
class Row:
    setting: Setting
    result: str  # ok, skipped: ..., out of memory, FAILED: ...
    measured: Measured | None = None
    seconds: float = 0.0


@dataclass
class Figure:
    """The trainer's own images_per_second at a row's settings, from a real run of train_text_to_image.py."""

    setting: Setting
    result: str
    images_per_second: float | None = None  # the mean of its logged values after the first interval
    steps: tuple[int, ...] = ()
    seconds: float = 0.0


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


@dataclass(frozen=True, kw_only=True)
class Place:
    """Where the rows run: the data and encoder they train on, their folders, the device and its peak."""

    data: Path
    encoder: Path
    work: Path
    on_gpu: bool
    peak: float | None
    device: str


def warmup_steps() -> int:
    from text_to_image.captured import EAGER_STEPS_BEFORE_CAPTURE

    # the eager steps, the capture, one replay; compile happens on the first
    return EAGER_STEPS_BEFORE_CAPTURE + 2


def grid_for(on_gpu: bool, args: argparse.Namespace) -> Grid:
    if on_gpu:
        grid = dict(presets=PRESETS, resolutions=(32, 64), batches=(128, 256, 512, 1024), timed_steps=20)
        grid |= dict(profiled_steps=3, precision="bf16", log_every=50)
    else:  # seconds on two cores: the same jobs, tiny
        grid = dict(presets=("tiny", "small"), resolutions=(16,), batches=(2,), timed_steps=3)
        grid |= dict(profiled_steps=1, precision="no", log_every=2)
    chosen = {name: tuple(value) for name in ("presets", "resolutions", "batches") if (value := getattr(args, name))}
    grid |= chosen
    if args.steps:
        grid["timed_steps"] = args.steps
    compared = grid["presets"] if on_gpu else grid["presets"][:1]
    return Grid(**grid, compared_presets=tuple(compared))


def job_order(grid: Grid) -> list[tuple[str, Setting]]:
    """Most useful first: every preset eager and graphed at the first resolution and batch, the trainer's own
    figures there, the other batches, the compile modes, then the next resolution."""
    rows = [
        Setting(preset, resolution, batch, mode)
        for resolution in grid.resolutions
        for modes in (FAST_MODES, COMPILED_MODES)
        for batch in grid.batches
        for preset in grid.presets
        for mode in modes
    ]
    first = len(grid.presets) * len(FAST_MODES)
    return (
        [("row", s) for s in rows[:first]]
        + [("trainer", s) for s in grid.compared()]
        + [("row", s) for s in rows[first:]]
    )


# ---- one row: the trainer's run, stepped and timed ----


def trainer_argv(setting: Setting, grid: Grid, place: Place, output_dir: Path, steps: int) -> list[str]:
    """gpu_check's run (grids, exports and checkpoints out of the way) at this preset, batch, precision and
    mode; later flags win (argparse), so the preset replaces gpu_check's tiny."""
    flags = gpu_check.trainer_flags(place.data, place.encoder, output_dir, setting.resolution, setting.batch, steps)
    flags += ["--model_size", setting.preset, "--mixed_precision", grid.precision, *MODES[setting.mode]]
    return [str(flag) for flag in flags]


def take_steps(run, count: int) -> float:
    """Seconds spent inside `count` calls of the trainer's step: the host's share, no sync here."""
    inside = 0.0
    for _ in range(count):
        started = time.perf_counter()
        run.trainer.step(run.state.step)
        inside += time.perf_counter() - started
        run.state.step += 1
    return inside


def timed_steps(run, count: int) -> tuple[float, float]:
    """(wall seconds from a sync before `count` steps to a sync after them, seconds inside the step calls)."""
    benchmark.wait_for_device()
    started = time.perf_counter()
    inside = take_steps(run, count)
    benchmark.wait_for_device()
    return time.perf_counter() - started, inside


def device_work(events) -> tuple[int, float]:
    """(kernels, microseconds of kernels and copies) among a profile's events on the GPU."""
    from torch.autograd import DeviceType

    kernels, busy_us = 0, 0.0
    for event in events:
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        copy = event.name.startswith(("Memcpy", "Memset"))
        # kineto names the kinds "kernel", "gpu_memcpy", ... ("Kernel" in some builds); older torch does not say
        kind = (getattr(event, "activity_type", None) or ("gpu_memcpy" if copy else "kernel")).lower()
        if kind not in ("kernel", "gpu_memcpy", "gpu_memset"):  # e.g. gpu_user_annotation: a span over kernels
            continue
        kernels += kind == "kernel"
        busy_us += event.time_range.elapsed_us()
    return kernels, busy_us


def kernels_and_device_ms(run, steps: int, on_gpu: bool) -> tuple[float | None, float | None]:
    """Kernels per step and their device ms per step (torch.profiler, CUDA activity); on the CPU dispatched ops
    per step and None."""
    if not on_gpu:
        with benchmark.OpCounter() as counter:
            take_steps(run, steps)
        return counter.ops / steps, None
    from torch.profiler import ProfilerActivity, profile

    benchmark.wait_for_device()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        take_steps(run, steps)
        benchmark.wait_for_device()
    kernels, busy_us = device_work(profiler.events())
    if kernels == 0:  # a profiler that did not trace this step's kernels: no figure rather than a zero
        return None, None
    return kernels / steps, busy_us / 1000 / steps


def flops_per_image(run, resolution: int) -> float:
    """The UNet's training FLOPs per image (forward + backward), counted on two images of the row's shapes."""
    import torch

    from text_to_image.common import unwrap

    unet = unwrap(run.accelerator, run.trainer.unet)
    device = next(unet.parameters()).device
    pixels = torch.randn(2, unet.config.in_channels, resolution, resolution, device=device)
    text = torch.randn(2, run.text_max_length, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (2,), device=device)
    return benchmark.training_flops_per_image(unet, pixels, timesteps, text)


def mode_note(setting: Setting, run) -> str:
    """What the trainer did instead of the mode asked for, if anything, and where its data was."""
    from text_to_image.resident import ResidentBatches

    notes = ["data on the device"] if isinstance(run.trainer.batches, ResidentBatches) else []
    captured = run.trainer.captured
    if "--cuda_graphs" in MODES[setting.mode] and captured is None:
        if run.accelerator.device.type != "cuda":
            notes.append("--cuda_graphs needs CUDA: the trainer stepped eagerly")
        else:
            notes.append("the trainer refused --cuda_graphs (its warning says why) and stepped eagerly")
    elif "--cuda_graphs" in MODES[setting.mode] and captured.replay is None:
        notes.append("not captured after the warm-up")
    return "; ".join(notes)


def measure(setting: Setting, grid: Grid, place: Place, flops: dict) -> Measured:
    """Set up the row's run, warm it up, time K steps between two syncs, profile a few more, count its FLOPs."""
    started = time.perf_counter()
    run = benchmark.set_up_training(trainer_argv(setting, grid, place, place.work / "rows" / setting.slug(), 1000))
    try:
        setup_s = time.perf_counter() - started
        run.trainer.unet.train()  # as training.train does before its first step
        warmup_s, _ = timed_steps(run, warmup_steps())
        wall_s, host_s = timed_steps(run, grid.timed_steps)
        kernels, device_ms = kernels_and_device_ms(run, grid.profiled_steps, place.on_gpu)
        key = (setting.preset, setting.resolution)
        if key not in flops:  # the same whatever the batch and mode
            flops[key] = flops_per_image(run, setting.resolution)
        rate = run.trainer.images_per_step() * grid.timed_steps / wall_s
        step_s = wall_s / grid.timed_steps
        return Measured(
            images_per_second=rate,
            flops_per_image=flops[key],
            mfu=rate * flops[key] / place.peak if place.peak else None,
            kernels_per_step=kernels,
            host_ms=1000 * host_s / grid.timed_steps,
            device_ms=device_ms,
            wall_ms=1000 * step_s,
            setup_s=setup_s,
            first_steps_s=max(0.0, warmup_s - warmup_steps() * step_s),
            note="; ".join(filter(None, [mode_note(setting, run), "" if kernels else "the profiler saw no kernels"])),
        )
    finally:
        run.accelerator.free_memory()


def release_memory(compiled: bool) -> None:
    """Free the last row's run before the next: its weights, optimizer state, graph pool and compiled code."""
    import torch

    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fresh_compile_cache() -> None:
    """Each row compiles for its own static batch: no graph cached from another row, and no dimension marked
    dynamic because it changed from one row to the next (dynamo's automatic dynamic shapes)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.automatic_dynamic_shapes = False


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:120] if lines else ''}"


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def expected_seconds(setting: Setting, rows: list[Row], grid: Grid, on_gpu: bool) -> float:
    """A row's expected time, from the last measured row of its mode (of its preset where there is one): its
    setup and compile or capture time as they were, its steps scaled by the work (batch x pixels)."""
    measured = [row for row in rows if row.measured and row.setting.mode == setting.mode]
    if not measured:
        return FIRST_GUESS_S[(on_gpu, setting.compiles())]
    same_preset = [row for row in measured if row.setting.preset == setting.preset]
    reference = (same_preset or measured)[-1]
    step_s = reference.measured.wall_ms / 1000 * setting.work() / reference.setting.work()
    steps = warmup_steps() + grid.timed_steps + grid.profiled_steps
    return reference.measured.setup_s + reference.measured.first_steps_s + 1.2 * steps * step_s


def table_row(setting: Setting, grid: Grid, place: Place, budget: Budget, rows: list[Row], flops: dict) -> Row:
    if setting.compiles() and not place.on_gpu:
        return Row(setting, "skipped: needs a GPU")
    if expected_seconds(setting, rows, grid, place.on_gpu) > budget.left():
        return Row(setting, "skipped: time budget")
    if setting.compiles():
        fresh_compile_cache()
    started, measured = time.perf_counter(), None
    try:
        measured, result = measure(setting, grid, place, flops), "ok"
    except Exception as error:  # the next row goes on; the traceback goes to stderr
        if is_out_of_memory(error):
            result = "out of memory"
        else:
            traceback.print_exc()
            result = f"FAILED: {first_line(error)}"
    release_memory(setting.compiles())  # after the except block: the traceback no longer holds the run
    return Row(setting, result, measured, time.perf_counter() - started)


# ---- the trainer's own figure: a real run of train_text_to_image.py, its tensorboard log read back ----


def logged_rates(logs: Path) -> list[tuple[int, float]]:
    """(step, images_per_second) as the trainer logged them to tensorboard under `logs`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(logs.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "images_per_second" in accumulator.Tags()["scalars"]:
            return [(event.step, event.value) for event in accumulator.Scalars("images_per_second")]
    return []


def trainer_figure(setting: Setting, grid: Grid, place: Place, budget: Budget, figures: list[Figure]) -> Figure:
    """The trainer's steady-state images_per_second at these settings: its logs after the first interval (which
    holds the compile or capture), from a run of 3 intervals."""
    expected = figures[-1].seconds if figures and figures[-1].seconds else FIRST_TRAINER_GUESS_S[place.on_gpu]
    if expected > budget.left():
        return Figure(setting, "skipped: time budget")
    output = place.work / "trainer" / setting.slug()
    flags = trainer_argv(setting, grid, place, output, 3 * grid.log_every)
    flags += ["--logger", "tensorboard", "--logging_steps", str(grid.log_every)]
    ok, text, seconds = gpu_check.run([sys.executable, gpu_check.TRAINER, *flags], timeout=max(1, int(budget.left())))
    if not ok:
        stopped = text.startswith("timed out")
        return Figure(setting, "skipped: time budget (stopped)" if stopped else f"FAILED: {gpu_check.summary(text)}")
    steady = [(step, rate) for step, rate in logged_rates(output / "logs") if step > grid.log_every]
    if not steady:
        return Figure(setting, "FAILED: no images_per_second in its tensorboard log", seconds=seconds)
    steps, rates = zip(*steady, strict=True)
    return Figure(setting, "ok", statistics.mean(rates), steps, seconds)


# ---- the tables ----


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table_line(row: Row) -> str:
    s, m = row.setting, row.measured
    cells = [s.preset, str(s.resolution), str(s.batch), s.mode, row.result]
    if m is None:
        cells += ["–"] * 8 + [""]
    else:
        mfu = "unknown" if m.mfu is None else f"{m.mfu:.1%}"
        cells += [number(m.images_per_second), f"{m.flops_per_image / 1e9:.2f}", mfu, number(m.kernels_per_step, 0)]
        cells += [number(m.host_ms, 2), number(m.device_ms, 2), number(m.wall_ms, 2), f"{row.seconds:.0f}", m.note]
    return "| " + " | ".join(cells) + " |"


def table_rate(setting: Setting, rows: list[Row]) -> float | None:
    return next((row.measured.images_per_second for row in rows if row.setting == setting and row.measured), None)


def trainer_share(figure: Figure, rows: list[Row]) -> float | None:
    """The trainer's images_per_second over the table's img/s at the same settings (None: one is missing)."""
    table = table_rate(figure.setting, rows)
    return None if figure.images_per_second is None or table is None else figure.images_per_second / table


def within_bar(share: float) -> bool:
    """The trainer's figure against the table's, judged as printed: 0.85 is within 15% whichever side of it the
    unrounded share fell."""
    return round(abs(share - 1), 2) <= WITHIN


def figure_line(figure: Figure, rows: list[Row]) -> str:
    s, rate, share = figure.setting, figure.images_per_second, trainer_share(figure, rows)
    logged = "–" if rate is None else f"{number(rate)} (steps {', '.join(map(str, figure.steps))})"
    verdict = "–"
    if share is not None:
        verdict = f"{share:.2f} ({'within' if within_bar(share) else 'off by more than'} {WITHIN:.0%})"
    cells = [s.preset, str(s.resolution), str(s.batch), s.mode, figure.result, logged]
    cells += [number(table_rate(s, rows)), verdict]
    return "| " + " | ".join(cells) + " |"


def order_key(setting: Setting) -> tuple:
    presets = {preset: index for index, preset in enumerate(PRESETS)}
    return (
        setting.resolution,
        presets.get(setting.preset, len(presets)),
        setting.batch,
        list(MODES).index(setting.mode),
    )


def format_tables(rows: list[Row], figures: list[Figure], grid: Grid, place: Place, budget: Budget) -> str:
    import torch

    kernels = "kernels per step" if place.on_gpu else "ops per step (CPU: benchmark.OpCounter, not kernels)"
    device_ms = "GPU ms per step" if place.on_gpu else "GPU ms per step (none on the CPU)"
    precision = "bf16" if grid.precision == "bf16" else "fp32"
    lines = [
        f"Throughput of the trainer's own step: {place.device}; {precision}; torch {torch.__version__}; the shapes"
        f" data, a 2-layer 128-wide text encoder, captions cached; {grid.timed_steps} timed steps after"
        f" {warmup_steps()} warm-up steps; budget {budget.seconds:.0f} s",
        "",
        f"| --model_size | px | batch | mode | result | img/s | GFLOP/image | MFU | {kernels} | host ms per step"
        f" | {device_ms} | wall ms per step | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(table_line(row) for row in sorted(rows, key=lambda row: order_key(row.setting))),
        "",
        f"img/s and wall ms: {grid.timed_steps} Trainer.step calls between two synchronisations. host ms: the time"
        " spent inside those calls (near wall ms: the step waits on the host; GPU ms near wall ms: on the GPU)."
        f" {'Kernels and GPU ms: torch.profiler (CUDA activity) over' if place.on_gpu else 'Ops: counted over'}"
        f" {grid.profiled_steps} more step{'s' * (grid.profiled_steps > 1)}"
        f"{', the summed device time of kernels and copies' if place.on_gpu else ''}."
        " GFLOP/image: the UNet's forward + backward (FlopCounterMode); MFU: img/s x GFLOP/image over the peak."
        " seconds: the row's whole time (setup, warm-up with compile or capture, timing, profile).",
        "",
        f"The trainer's own images_per_second (train_text_to_image.py, logged every {grid.log_every} steps of"
        f" {3 * grid.log_every}, read back from tensorboard; the first interval holds the compile or capture)",
        "",
        "| --model_size | px | batch | mode | result | trainer's images_per_second | table's img/s | trainer / table |",
        "|---|---|---|---|---|---|---|---|",
        *(figure_line(figure, rows) for figure in figures),
    ]
    return "\n".join(lines)


def summary(rows: list[Row], figures: list[Figure]) -> str:
    results = [row.result for row in rows]
    counts = {result: results.count(result) for result in dict.fromkeys(results) if result != "ok"}
    others = "".join(f", {count} {result}" for result, count in counts.items())
    shares = [share for figure in figures if (share := trainer_share(figure, rows)) is not None]
    within = sum(within_bar(share) for share in shares)
    return (
        f"{SUMMARY_PREFIX} {results.count('ok')} of {len(rows)} rows measured{others}; the trainer's own figure"
        f" within {WITHIN:.0%} of the table's in {within} of {len(shares)} compared"
    )


# ---- the run ----


def prepare_place(work: Path, grid: Grid, on_gpu: bool) -> Place:
    """The shapes data (enough for the largest batch after the held-out 2%) and the text encoder, drawn here."""
    import torch

    count = max(32, math.ceil(max(grid.batches) * 1.05) + 8)
    data, encoder = gpu_check.prepare(work, max(grid.resolutions), count)
    if on_gpu:
        name = torch.cuda.get_device_name()
        peak = benchmark.gpu_peak_flops(name)
        shown = "unknown" if peak is None else f"{peak / 1e12:.0f} TFLOP/s dense bf16"
        device = f"{name} (CUDA {torch.version.cuda}), peak {shown}"
    else:
        peak = benchmark.measured_cpu_peak_flops(torch.float32)
        threads = torch.get_num_threads()
        device = f"CPU dry run ({threads} thread{'s' * (threads > 1)}), peak {peak / 1e12:.3f} TFLOP/s fp32 (measured)"
    return Place(data=data, encoder=encoder, work=work, on_gpu=on_gpu, peak=peak, device=device)


def measure_all(grid: Grid, place: Place, budget: Budget, output: Path) -> tuple[list[Row], list[Figure]]:
    rows, figures, flops = [], [], {}
    for kind, setting in job_order(grid):
        if kind == "row":
            rows.append(table_row(setting, grid, place, budget, rows, flops))
        else:
            figures.append(trainer_figure(setting, grid, place, budget, figures))
        output.write_text(format_tables(rows, figures, grid, place, budget) + "\n")  # a run cut short keeps these
        done = rows[-1] if kind == "row" else figures[-1]
        print(f"{kind} {setting.slug()}: {done.result} ({done.seconds:.0f} s)", file=sys.stderr, flush=True)
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="A dry run on the CPU: tiny sizes, compile rows skipped.")
    parser.add_argument("--output", type=Path, default=Path("throughput.md"), help="Where the tables are written.")
    parser.add_argument("--work_dir", type=Path, help="Keep the data and runs here (default: a temporary folder).")
    parser.add_argument(
        "--budget_s", type=float, default=300.0, help="Seconds for all rows: those that no longer fit are listed."
    )
    parser.add_argument("--steps", type=int, help="Timed steps per row (default: 20 on a GPU, 3 on the CPU).")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, help="Only these --model_size presets.")
    parser.add_argument("--resolutions", nargs="+", type=int, help="Only these resolutions (default: 32 64).")
    parser.add_argument("--batches", nargs="+", type=int, help="Only these batch sizes (default: 128 256 512 1024).")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU, the trainer's runs too
        # it checks the paths, not the speed: one thread, because two OpenMP threads beside another busy process
        # on a 2-core CI machine made its steps 10-100x slower (measured: 5 s instead of 0.1 s)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu and not args.cpu:
        sys.exit("error: no CUDA GPU is visible; run with --cpu for the dry run")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid, budget = grid_for(on_gpu, args), Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="throughput-") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        place = prepare_place(work, grid, on_gpu)
        rows, figures = measure_all(grid, place, budget, args.output)
    text = format_tables(rows, figures, grid, place, budget) + f"\n\n{summary(rows, figures)}"
    print(text)  # the summary last: gpu_check quotes it
    args.output.write_text(text + "\n")
    failed = any(item.result.startswith("FAILED") for item in [*rows, *figures])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
