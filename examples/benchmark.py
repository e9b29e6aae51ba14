"""Measure what the trainer's caching and batched sampling buy: a Markdown table of img/s and peak memory.

Training rows run the trainer's own setup and step (`setup.setup_run`, `training.Trainer.step`), each
configuration in its own process so its peak memory is its own:
  (a) the seed README configuration: the original UNet (`seed_unet.json`, 32 px), batch 3 x
      accumulation 4, a CLIP-L-shaped text encoder (768 wide, 12 layers, random weights, no
      download) -- without caching as the seed script did (encoder in every step on captions
      padded to 77 tokens, images decoded every step), the same with captions padded only to the
      longest one, with the caching, and with the caching plus bf16 autocast;
  (b) a small configuration (the quickstart's UNet at 32 px, a 2-layer encoder, batch 32), the
      same three without bf16.
Sampling rows compare a 16-image grid (one batch, DPM-Solver++ 25 steps, guidance in the same
UNet call) with the seed's way (1000 DDPM steps, one prompt at a time, extrapolated from a few).

    python examples/benchmark.py --data_dir ../shared/datasets/emoji-noto-32 --output benchmark-table.md
    python examples/benchmark.py --quick     # seconds: tiny models, checks that it all runs

The full run sets up each group of configurations ((a) fp32, (a) bf16, (b)) in one process and
times their optimizer steps in turn with all the threads, so that the ratios compare steps taken
seconds apart; setup time and peak memory come from one process per configuration. --quick runs two
worker processes at a time, forked from one that imported torch and the trainer once, one torch thread
each, one timed step, 2-step grids and no "padded to the longest" rows, so the smoke test is short. bf16 rows are left out of a full run on a CPU
without native bf16 (AVX512-BF16 or AMX), which emulates it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(EXAMPLES))

UNCACHED = ["--no_caption_cache", "--image_cache_max_gb", "0"]
SEED_PADDING = ["--caption_max_length", "77"]  # the seed padded every caption to CLIP's 77 tokens
SEED_UNET = ["--no-pooled_text"]  # the seed's UNet as it was: no pooled-caption embedding
GRID_IMAGES = 16
SEED_SAMPLING_STEPS = 1000


SEEDS_WAY = "{} config, no caching, captions padded to 77 tokens (the seed's way)"
UNCACHED_SHORT = "{} config, no caching, captions padded to the longest"


def training_configs(quick: bool, bf16: bool) -> list[dict]:
    """Name, encoder, UNet config, batch, accumulation and extra flags of each training row."""
    seed_unet = EXAMPLES / ("shapes_unet.json" if quick else "seed_unet.json")
    small_unet = EXAMPLES / "shapes_unet.json"
    seed = {"encoder": "clip-l", "unet": seed_unet, "batch": 3, "accumulation": 4, "group": "a"}
    small = {"encoder": "small", "unet": small_unet, "batch": 8 if quick else 32, "accumulation": 1, "group": "b"}
    # a group of its own: accelerate allows one mixed-precision setting per process
    bf16_row = {"name": "(a) seed config, cached + bf16", "flags": ["--mixed_precision", "bf16"], "group": "a-bf16"}
    with_bf16 = [{**seed, **bf16_row}]
    # --quick leaves out the rows that differ from the seed's way only by a flag: each worker costs ~10 s to start
    # and, to keep the full run under 10 minutes, they are timed only (no setup-and-memory process)
    short = {"flags": UNCACHED, "speed_only": True}
    seed_short = [] if quick else [{**seed, **short, "name": UNCACHED_SHORT.format("(a) seed")}]
    small_short = [] if quick else [{**small, **short, "name": UNCACHED_SHORT.format("(b) small")}]
    return [
        {**seed, "name": SEEDS_WAY.format("(a) seed"), "flags": UNCACHED + SEED_PADDING + SEED_UNET, "baseline": True},
        *seed_short,
        {**seed, "name": "(a) seed config, cached", "flags": []},
        *(with_bf16 if bf16 else []),
        {
            **small,
            "name": SEEDS_WAY.format("(b) small"),
            "flags": UNCACHED + SEED_PADDING + SEED_UNET,
            "baseline": True,
        },
        *small_short,
        {**small, "name": "(b) small config, cached", "flags": []},
    ]


def measure_bf16(quick: bool) -> bool:
    """bf16 rows only where bf16 is native: on a CPU without AVX512-BF16/AMX it is emulated, 5-10x slower."""
    import torch

    from text_to_image.config import cpu_has_native_bf16

    return quick or (torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16())


# ---- inputs: data and text encoders, made here so nothing downloads ----


def prepare_data(data_dir: Path | None, work: Path, quick: bool) -> Path:
    if data_dir:
        if not (data_dir / "metadata.jsonl").is_file() and not (data_dir / "metadata.csv").is_file():
            sys.exit(f"error: --data_dir {data_dir} has no metadata.jsonl or metadata.csv (an imagefolder is needed)")
        return data_dir
    from make_shapes_dataset import make_shapes_dataset

    return make_shapes_dataset(work / "shapes", count=48 if quick else 720, resolution=32)


def dataset_captions(data_dir: Path) -> list[str]:
    from make_text_encoder import read_captions

    metadata = data_dir / "metadata.jsonl"
    if metadata.is_file():
        return read_captions(metadata, "text")
    import csv

    with open(data_dir / "metadata.csv") as file:
        return [row.get("text") or "" for row in csv.DictReader(file)]


def prepare_encoders(captions: list[str], work: Path, quick: bool) -> dict[str, Path]:
    """A CLIP-L-shaped encoder (random weights) and a small one, both with the captions' vocabulary."""
    from make_text_encoder import build_text_encoder

    clip_l = (64, 2, 2) if quick else (768, 12, 12)
    return {
        "clip-l": build_text_encoder(captions, work / "clip-l", *clip_l, max_length=77),
        "small": build_text_encoder(captions, work / "small", 64 if quick else 128, 2, 4, max_length=77),
    }


# ---- workers: each measurement in its own process ----


def trainer_argv(config: dict, data_dir: Path, encoder: Path, output_dir: Path, steps: int, quick: bool) -> list[str]:
    return [
        "--train_data_dir", str(data_dir),
        "--text_encoder_name_or_path", str(encoder),
        "--model_config_name_or_path", str(config["unet"]),
        "--resolution", "16" if quick else "32",
        "--train_batch_size", str(config["batch"]),
        "--gradient_accumulation_steps", str(config["accumulation"]),
        "--max_train_steps", str(steps),
        "--output_dir", str(output_dir),
        "--random_flip",
        "--logger", "none",
        "--seed", "0",
        *config["flags"],
    ]  # fmt: skip


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and bytes on macOS
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def wait_for_device() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_up_training(argv: list[str]):
    """The trainer's own Run for these flags (its steps are taken from step 0 on)."""
    from text_to_image.config import RunConfig, parse_args
    from text_to_image.setup import setup_run

    args = parse_args(argv)
    config = RunConfig.from_args(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    return setup_run(config)


def time_optimizer_step(run) -> float:
    wait_for_device()
    started = time.perf_counter()
    run.trainer.step(run.state.step)
    run.state.step += 1
    wait_for_device()
    return time.perf_counter() - started


def measure_setup_and_memory(argv: list[str]) -> dict:
    """Setup time, and the peak memory of setup plus one optimizer step (which allocates AdamW's state)."""
    started = time.perf_counter()
    run = set_up_training(argv)
    setup_seconds = time.perf_counter() - started
    time_optimizer_step(run)
    return {"setup_s": setup_seconds, "peak_rss_mib": peak_rss_mib()}


def measure_speeds_in_turn(argvs: list[list[str]], timed_steps: int) -> dict:
    """img/s of several configurations set up in one process, their optimizer steps timed in turn.

    A shared CPU's speed drifts by 20% over minutes; configurations timed one after another see the
    same drift, so their ratio holds where separate processes' did not (three back-to-back runs gave
    caching 0.94x to 1.39x). img/s is from the median step: a neighbour's burst spoils a step or two.
    """
    runs, setup_seconds = [], []
    for argv in argvs:
        started = time.perf_counter()
        runs.append(set_up_training(argv))
        setup_seconds.append(time.perf_counter() - started)
    for run in runs:  # warm-up: allocator, kernels, first optimizer state
        time_optimizer_step(run)
    step_seconds = [[] for _ in runs]
    for round_index in range(timed_steps):
        for offset in range(len(runs)):  # each round starts with the next configuration
            index = (round_index + offset) % len(runs)
            step_seconds[index].append(time_optimizer_step(runs[index]))
    images = [run.trainer.images_per_step() for run in runs]
    rates = [count / statistics.median(seconds) for count, seconds in zip(images, step_seconds, strict=True)]
    return {"img_per_s": rates, "setup_s": setup_seconds, "peak_rss_mib": peak_rss_mib()}


def build_sampling_pipeline(unet_config: Path, encoder: Path, resolution: int):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from pipeline_text_to_image import TextToImagePipeline

    torch.manual_seed(0)
    text_encoder = CLIPTextModel.from_pretrained(encoder)
    config = json.loads(unet_config.read_text())
    config.update(sample_size=resolution, cross_attention_dim=text_encoder.config.hidden_size)
    unet = UNet2DConditionModel.from_config(config)
    pipeline = TextToImagePipeline(
        unet, DDPMScheduler(num_train_timesteps=1000), text_encoder, AutoTokenizer.from_pretrained(encoder)
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def measure_sampling(task: dict) -> dict:
    """Seconds for a batched 16-image grid vs 16 sequential 1000-step DDPM samples (extrapolated)."""
    import torch

    from pipeline_text_to_image import make_sampling_scheduler

    prompts = task["prompts"]
    pipeline = build_sampling_pipeline(Path(task["unet"]), Path(task["encoder"]), task["resolution"])
    ddpm_config = pipeline.scheduler.config
    generator = torch.Generator().manual_seed(0)
    pipeline(prompts[:1], num_inference_steps=2, generator=generator)  # warm-up
    pipeline.scheduler = make_sampling_scheduler("dpm", ddpm_config)
    grid_seconds = {}
    # 1.0: no unconditional branch, as the seed sampled; bf16: the autocast the trainer's grids run
    # under with --mixed_precision bf16
    for name, guidance, bf16 in grid_kinds(task["bf16"]):
        started = time.perf_counter()
        with torch.autocast(pipeline.device.type, dtype=torch.bfloat16, enabled=bf16):
            pipeline(prompts, num_inference_steps=task["grid_steps"], guidance_scale=guidance, generator=generator)
        grid_seconds[name] = time.perf_counter() - started
    pipeline.scheduler = make_sampling_scheduler("ddpm", ddpm_config)
    started = time.perf_counter()
    pipeline(prompts[:1], num_inference_steps=task["seed_steps"], guidance_scale=1.0, generator=generator)
    per_step = (time.perf_counter() - started) / task["seed_steps"]
    return {
        **{f"grid_{name}_s": seconds for name, seconds in grid_seconds.items()},
        "sequential_s": per_step * SEED_SAMPLING_STEPS * len(prompts),
        "peak_rss_mib": peak_rss_mib(),
    }


def run_worker(task: dict, threads: int | None = None, quick: bool = False) -> dict:
    """Run one measurement in a fresh Python process; its result comes back as JSON on the last line.

    --quick forks it from gpu_check's fork server (torch and the trainer imported once), as gpu_check's CPU dry
    run does: its numbers mean nothing, and each worker would otherwise spend 5-10 s importing them."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    arguments = [__file__, "--worker", json.dumps(task)]
    if quick:
        import gpu_check

        returncode, stdout, stderr = gpu_check.run_preloaded(arguments, environment, timeout=600)
    else:
        result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=environment)
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    if returncode != 0:
        sys.exit(f"error: benchmark worker '{task['name']}' failed:\n{stderr[-3000:]}")
    print(f"{task['name']}: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(stdout.strip().splitlines()[-1])


def worker_main(task: dict) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if "OMP_NUM_THREADS" in os.environ:  # a forked worker's torch was imported before the variable was set
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if task["kind"] == "setup":
        result = measure_setup_and_memory(task["argv"])
    elif task["kind"] == "speed":
        result = measure_speeds_in_turn(task["argvs"], task["timed_steps"])
    else:
        result = measure_sampling(task)
    print(json.dumps(result), flush=True)


def run_workers(tasks: list[dict], quick: bool) -> list[dict]:
    """Each task in its own process: one at a time, or (--quick) two at a time with one thread each."""
    if not quick:
        return [run_worker(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda task: run_worker(task, threads=1, quick=True), tasks))


# ---- the table ----


def training_tasks(configs: list[dict], data_dir: Path, encoders: dict, work: Path, args) -> list[dict]:
    """A setup-and-memory task per configuration (not with --quick: a worker takes ~10 s to start), then a
    speed task per group (its configurations in turn)."""
    setup_tasks, groups = [], {}
    for index, config in enumerate(configs):
        # the full run's speed task reuses the setup task's folder and so its caption cache (no second
        # CLIP-L encoding); --quick runs tasks side by side, so each gets a folder of its own
        folders = (work / f"run-{index}", work / (f"speed-{index}" if args.quick else f"run-{index}"))
        encoder, steps = encoders[config["encoder"]], args.steps + 2
        setup_argv, speed_argv = (trainer_argv(config, data_dir, encoder, f, steps, args.quick) for f in folders)
        if not config.get("speed_only"):
            setup_tasks.append({"kind": "setup", "name": config["name"], "argv": setup_argv})
        groups.setdefault(config["group"], []).append(speed_argv)
    speed_tasks = [
        {"kind": "speed", "name": f"group {group}, in turn", "argvs": argvs, "timed_steps": args.steps}
        for group, argvs in groups.items()
    ]
    return speed_tasks if args.quick else setup_tasks + speed_tasks


def by_config(configs: list[dict], speed_results: list[dict]) -> tuple[list[dict], list[float]]:
    """The speed tasks' setup times, peaks and img/s, back in the order of the configurations."""
    groups = list(dict.fromkeys(config["group"] for config in configs))
    results = dict(zip(groups, speed_results, strict=True))
    in_group = {
        group: iter(zip(result["setup_s"], result["img_per_s"], strict=True)) for group, result in results.items()
    }
    setups, speeds = [], []
    for config in configs:
        setup_s, speed = next(in_group[config["group"]])
        setups.append({"setup_s": setup_s, "peak_rss_mib": results[config["group"]]["peak_rss_mib"]})
        speeds.append(speed)
    return setups, speeds


def training_rows(configs: list[dict], setups: list[dict | None], speeds: list[float]) -> list[str]:
    rows, baseline = [], None
    for config, setup, speed in zip(configs, setups, speeds, strict=True):
        baseline = speed if config.get("baseline") else baseline
        setup_s, peak = (f"{setup['setup_s']:.1f}", f"{setup['peak_rss_mib']:.0f}") if setup else ("–", "–")
        rows.append(f"| {config['name']} | {speed:.2f} | {speed / baseline:.2f}x | {setup_s} | {peak} |")
    return rows


def setups_by_config(configs: list[dict], setup_results: list[dict]) -> list[dict | None]:
    """The setup tasks' results in the order of the configurations; None for the timed-only rows."""
    results = iter(setup_results)
    return [None if config.get("speed_only") else next(results) for config in configs]


def seed_sampling_steps(quick: bool) -> int:
    return 3 if quick else 10


def grid_steps(quick: bool) -> int:
    # the trainer's default; --quick takes 2 so a bf16 grid stays short on CPUs that emulate bf16
    return 2 if quick else 25


def grid_kinds(bf16: bool) -> list[tuple[str, float, bool]]:
    """(name, guidance, bf16 autocast): 1.0 is no unconditional branch, as the seed sampled; bf16 is
    the autocast the trainer's grids run under with --mixed_precision bf16."""
    kinds = [("guided", 3.0, False), ("unguided", 1.0, False), ("guided_bf16", 3.0, True)]
    return kinds if bf16 else kinds[:2]


def sampling_task(configs: list[dict], encoders: dict, captions: list[str], args) -> dict:
    seed = configs[0]
    prompts = (sorted({caption for caption in captions if caption}) * GRID_IMAGES)[:GRID_IMAGES]
    return {
        "kind": "sample",
        "name": "sampling",
        "unet": str(seed["unet"]),
        "encoder": str(encoders[seed["encoder"]]),
        "resolution": 16 if args.quick else 32,
        "prompts": prompts,
        "seed_steps": seed_sampling_steps(args.quick),
        "grid_steps": grid_steps(args.quick),
        "bf16": args.bf16,
    }


def sampling_rows(result: dict, args) -> list[str]:
    sequential, rss, steps = result["sequential_s"], result["peak_rss_mib"], grid_steps(args.quick)
    labels = {
        "guided": "guidance 3",
        "unguided": "no guidance (as the seed)",
        "guided_bf16": "guidance 3, bf16 autocast",
    }
    grids = [(name, labels[name]) for name, _, _ in grid_kinds(args.bf16)]
    return [
        f"| 16 prompts, 1000 DDPM steps each, one at a time (the seed's way)* | {GRID_IMAGES / sequential:.3f} | 1.00x | {sequential:.0f} s | {rss:.0f} |",
        *(
            f"| 16-image grid, one batch, DPM-Solver++ {steps} steps, {label} | {GRID_IMAGES / seconds:.3f} | {sequential / seconds:.0f}x | {seconds:.1f} s | {rss:.0f} |"
            for name, label in grids
            for seconds in [result[f"grid_{name}_s"]]
        ),
    ]


def format_table(train: list[str], sample: list[str], args, seconds: float, load: float) -> str:
    import torch

    threads = 1 if args.quick else torch.get_num_threads()
    return "\n".join(
        [
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores ({threads} torch threads), "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}; "
            f"load average {load:.2f} before the run"
            f"{'; QUICK MODE (tiny models, two workers at a time, numbers mean nothing)' if args.quick else ''}",
            "",
            f"| training: img/s of the median of {args.steps} optimizer steps, a group's configurations in turn* | img/s | vs the seed's way | setup s | peak RSS MiB |",
            "|---|---|---|---|---|",
            *train,
            "",
            "| sampling (seed UNet, CLIP-L-shaped encoder) | img/s | speedup | time | peak RSS MiB |",
            "|---|---|---|---|---|",
            *sample,
            "",
            "\\* training: each group's configurations (bf16 on its own) set up in one process and their optimizer"
            " steps timed in turn after one warm-up step each; setup time and peak memory from one process per"
            f" configuration (setup and one optimizer step){'; QUICK MODE: from the group process' if args.quick else ''}.",
            f"\\* sampling: extrapolated linearly from {seed_sampling_steps(args.quick)} DDPM steps of one prompt"
            " (each step is one UNet call of batch 1).",
            *(
                []
                if args.bf16
                else [
                    "bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16 or AMX), where it is slower than fp32."
                ]
            ),
            f"Whole benchmark: {seconds:.0f} s.",
        ]
    )


# Dense peak TFLOP/s of the cards our users train on, at the precision the trainer runs them in (fp16/bf16
# tensor cores; spec sheets, no sparsity). Matched as a part of torch.cuda.get_device_name(), the more specific
# names first: "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are slower cards than the SXM's "NVIDIA H100 80GB HBM3",
# and "L4" is a part of "NVIDIA L40S". A card not named here gets "unknown" for MFU.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "T4": 65.0,
}


def gpu_peak_flops(name: str) -> float | None:
    return next((tflops * 1e12 for card, tflops in GPU_PEAK_TFLOPS.items() if card in name), None)


def measured_cpu_peak_flops(dtype, repeats: int = 5) -> float:
    """The faster of a large matmul and a large 3x3 convolution on this CPU in this run: the ceiling a model's
    FLOP/s is divided by. Both, because torch's CPU matmul and oneDNN's convolution reach different speeds
    (on a 2-core AVX512 EPYC: 0.2 and 0.43 TFLOP/s fp32), and a UNet is mostly convolutions."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(dtype)
    features = torch.randn(8, 256, 32, 32, dtype=dtype)
    kernels = [
        (lambda: a @ b, 2 * 2048**3),
        (lambda: conv(features), 2 * 8 * 256 * 256 * 9 * 32 * 32),
    ]
    best = 0.0
    with torch.no_grad():
        for kernel, flops in kernels:
            kernel()  # warm-up
            for _ in range(repeats):
                started = time.perf_counter()
                kernel()
                best = max(best, flops / (time.perf_counter() - started))
    return best


def training_flops_per_image(unet, pixels, timesteps, text) -> float:
    """FLOPs of one forward + backward of the UNet (torch's FlopCounterMode: matmuls and convolutions), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(pixels, timesteps, encoder_hidden_states=text).sample.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(pixels)


def model_size_rows(
    resolution: int, text_width: int, batch: int, steps: int, precision: str, peak: float | None, sizes: list[str]
):
    """Parameters, training img/s (forward + backward + AdamW), FLOPs per image, achieved FLOP/s and MFU."""
    import torch

    from text_to_image.models import build_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    rows = []
    for size in sizes:
        unet = build_unet(None, resolution, text_width, size).to(device)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)  # as the trainer's on torch >= 2.4
        pixels = torch.randn(batch, 3, resolution, resolution, device=device)
        text = torch.randn(batch, 8, text_width, device=device)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
        with autocast:
            flops = training_flops_per_image(unet, pixels, timesteps, text)
        seconds = []
        for _ in range(steps + 1):  # the first step warms up allocators and kernels
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            with autocast:
                loss = unet(pixels, timesteps, encoder_hidden_states=text).sample.float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
        parameters = sum(parameter.numel() for parameter in unet.parameters()) / 1e6
        rate = batch / statistics.median(seconds[1:])
        achieved = flops * rate
        # three significant figures, not three decimals: a tiny UNet on a loaded CPU achieves under 0.0005 TFLOP/s
        mfu = f"{100 * achieved / peak:.3g}%" if peak else "unknown"
        rows.append(f"| {size} | {parameters:.1f}M | {rate:.1f} | {flops / 1e9:.2f} | {achieved / 1e12:.3g} | {mfu} |")
    return rows


def model_sizes_table(
    resolution: int,
    text_width: int,
    batch: int,
    steps: int,
    precision: str | None = None,
    sizes: list[str] | None = None,
) -> str:
    """The --model_sizes table for `sizes` (default: every --model_size preset)."""
    import torch

    from text_to_image.config import MODEL_SIZES

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        precision = precision or ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
        peak = gpu_peak_flops(name) if precision != "fp32" else None
        device = f"CUDA {name}; peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s dense {precision}'}"
    else:
        precision = precision or "fp32"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = measured_cpu_peak_flops(dtype)
        device = f"no GPU; peak {peak / 1e12:.3f} TFLOP/s {precision} (the faster of a matmul and a conv, measured in this run)"
    header = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), {device}; torch {torch.__version__}",
        "",
        f"| --model_size at {resolution} px, {text_width}-wide text encoder | parameters | img/s (batch {batch}, {precision}, median of {steps} steps) | GFLOP/image (fwd+bwd) | achieved TFLOP/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(
        header + model_size_rows(resolution, text_width, batch, steps, precision, peak, sizes or list(MODEL_SIZES))
    )


def random_feature_models(work: Path, tokenizer_dir: Path, quick: bool) -> tuple[Path, Path]:
    """DINOv2-small- and CLIP-ViT-B/32-shaped models with random weights (the real ones' cost, no download)."""
    import torch
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    torch.manual_seed(0)
    side, crop = (16, 16) if quick else (256, 224)
    dinov2 = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64) if quick else {}
    Dinov2Model(Dinov2Config(image_size=crop, patch_size=8 if quick else 14, **dinov2)).save_pretrained(work / "dinov2")
    BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": crop, "width": crop}).save_pretrained(
        work / "dinov2"
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64) if quick else {}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), **tiny),
        vision_config=dict(image_size=crop, patch_size=8 if quick else 32, **tiny),
    )
    CLIPModel(config).save_pretrained(work / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(work / "clip")
    return work / "dinov2", work / "clip"


# ---- ops per training step (issue 26: a step that waits on the host, not the GPU) ----


class OpCounter:
    """Counts the aten ops a region dispatches (one op is roughly one kernel launch on a GPU)."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                # a read of a value to the host (.item()) launches no kernel: the CPU's non-capturable AdamW
                # reads each step count so, where capturable AdamW on a GPU keeps them on the device
                counter.ops += func is not torch.ops.aten._local_scalar_dense.default
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = 0, Counting()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *error):
        return self.mode.__exit__(*error)


def step_ops_argv(size: str, data_dir: Path, encoder: Path, output_dir: Path, resolution: int, batch: int) -> list:
    """The trainer at this --model_size with its defaults: only the data, the batch and the logging are given."""
    return [
        "--train_data_dir", str(data_dir),
        "--text_encoder_name_or_path", str(encoder),
        "--model_size", size,
        "--resolution", str(resolution),
        "--train_batch_size", str(batch),
        "--max_train_steps", "1000",
        "--output_dir", str(output_dir),
        "--logger", "none",
        "--seed", "0",
    ]  # fmt: skip


def ops_and_host_ms(run, steps: int) -> tuple[int, float]:
    """Ops one Trainer.step dispatches, and the median host milliseconds of `steps` more."""
    with OpCounter() as counted:
        time_optimizer_step(run)
    seconds = [time_optimizer_step(run) for _ in range(steps)]
    return counted.ops, 1000 * statistics.median(seconds)


def record_once(run):
    """A CUDA graph's stand-in on the CPU: capturing runs the step once; a replay returns its outputs and does
    nothing on the host, as a graph launch is one call. What is left is the host's own work in a graphed step."""
    outputs = run()
    return lambda: outputs


def graphed_ops(run, steps: int) -> tuple[int, int, float]:
    """--cuda_graphs over --data_on_device: ops in one captured step (the kernels a replay launches at once),
    and the ops and median host ms the host still spends per step around the replay."""
    from text_to_image.captured import EAGER_STEPS_BEFORE_CAPTURE, CapturedStep, device_step_of

    trainer = run.trainer
    device_step = device_step_of(trainer)
    with OpCounter() as in_graph:
        device_step(device_step.inputs(trainer.micro_indices(run.state.step)))
    trainer.captured = CapturedStep(device_step, capture=record_once)
    for _ in range(EAGER_STEPS_BEFORE_CAPTURE + 1):  # eager steps, then the capture
        time_optimizer_step(run)
    host_ops, host_ms = ops_and_host_ms(run, steps)
    return in_graph.ops, host_ops, host_ms


def step_ops_row(size: str, argv: list[str], steps: int) -> str:
    """Per --model_size: the eager step's ops (its data and EMA shares) and host ms, on the host path and with
    --data_on_device; the ops of one captured step and what a graphed step leaves on the host."""
    host = set_up_training([*argv, "--data_on_device", "no"])
    for _ in range(2):  # warm-up: AdamW's state, the EMA's first step, the allocator
        time_optimizer_step(host)
    host_ops, host_ms = ops_and_host_ms(host, steps)
    trainer = host.trainer
    with OpCounter() as data:
        trainer.batches.micro_batch(host.state.step * trainer.accumulation)
    ema = OpCounter()
    if trainer.ema is not None:
        with ema:
            trainer.update_ema()
    del host, trainer
    resident = set_up_training([*argv, "--data_on_device", "yes"])
    for _ in range(2):
        time_optimizer_step(resident)
    resident_ops, resident_ms = ops_and_host_ms(resident, steps)
    in_graph, graphed_host_ops, graphed_ms = graphed_ops(resident, steps)
    return (
        f"| {size} | {host_ops:,} | {data.ops:,} | {ema.ops:,} | {host_ms:.1f} | {resident_ops:,} | {resident_ms:.1f}"
        f" | {in_graph:,} | {graphed_host_ops:,} | {graphed_ms:.2f} |"
    )


def step_ops_table(resolution: int, batch: int, steps: int, sizes: list[str], quick: bool) -> str:
    """Markdown: per --model_size, the ops one optimizer step dispatches and its host time, at `batch`, eager on
    the host path, eager with --data_on_device, and graphed (--cuda_graphs over --data_on_device)."""
    with tempfile.TemporaryDirectory(prefix="step-ops-") as work:
        work = Path(work)
        data_dir = prepare_data(None, work, quick=True)
        encoder = prepare_encoders(dataset_captions(data_dir), work, quick)["small"]
        rows = [
            step_ops_row(size, step_ops_argv(size, data_dir, encoder, work / size, resolution, batch), steps)
            for size in sizes
        ]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return "\n".join(
        [
            f"Ops per training step: the trainer's defaults at each --model_size, {resolution} px, batch {batch},"
            f" frozen encoder (captions cached), {device}; host ms is the median of {steps} steps. One op is"
            " roughly one kernel launch on a GPU. Graphed: --cuda_graphs over --data_on_device, its capture replaced"
            " by a stand-in that launches nothing (no GPU here), so its host figures leave out the one graph launch.",
            "",
            "| size | eager step: ops | of them: micro-batch (data) | of them: EMA | eager: host ms"
            " | eager, --data_on_device: ops | host ms | ops in one captured step | graphed step: host ops"
            " | graphed: host ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


# ---- memory per image of a training step (starting batch sizes per GPU class) ----

MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from text_to_image.models import build_unet
size, resolution, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
unet = build_unet(None, resolution, 768, size)
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
pixels, text = torch.randn(batch, 3, resolution, resolution), torch.randn(batch, 77, 768)
timesteps = torch.randint(0, 1000, (batch,))
try:  # the peak from here on: Linux resets it to the current size (imports and setup peak higher at times)
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
unet(pixels, timesteps, encoder_hidden_states=text).sample.square().mean().backward()
optimizer.step()
try:
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(size: str, resolution: int, batch: int) -> int:
    """Peak memory (KiB) of one fp32 training step (forward, backward, AdamW) at `batch`, in a fresh process."""
    command = [sys.executable, "-c", MEMORY_PROBE, str(REPO), size, str(resolution), str(batch)]
    result = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return int(result.stdout.split()[-1])


def memory_per_image_table(resolution: int, sizes: list[str], batches: tuple[int, int] = (8, 32)) -> str:
    """Markdown: per --model_size, the memory one more image adds to a training step (the activations kept for
    the backward pass), from the peak of two fresh processes at two batch sizes, in fp32 on the CPU."""
    rows = []
    for size in sizes:
        small, large = (peak_rss_kib(size, resolution, batch) for batch in batches)
        per_image = (large - small) * 1024 / (batches[1] - batches[0])
        rows.append(f"| {size} | {per_image / 2**20:.1f} |")
    return "\n".join(
        [
            f"Memory per image of one training step at {resolution} px, fp32 on the CPU (a 768-wide, 77-token text"
            f" embedding): (peak at batch {batches[1]} - peak at batch {batches[0]}) / {batches[1] - batches[0]}.",
            "",
            "| size | MiB per image (fp32) |",
            "|---|---|",
            *rows,
        ]
    )


def timed(action) -> tuple[float, object]:
    wait_for_device()
    started = time.perf_counter()
    result = action()
    wait_for_device()
    return time.perf_counter() - started, result


def evaluation_table(data_dir: Path | None, quick: bool) -> str:
    """Seconds each evaluation part takes at 32 px with the emoji runs' UNet (--model_size tiny)."""
    import torch

    from text_to_image.config import VALIDATION_BUCKETS
    from text_to_image.evaluation import TrainingReference, eval_mode, to_uint8_batch

    with tempfile.TemporaryDirectory(prefix="benchmark-evaluation-") as work:
        work = Path(work)
        data_dir = prepare_data(data_dir, work, quick)
        encoder = prepare_encoders(dataset_captions(data_dir), work, quick)["small"]
        dinov2, clip = random_feature_models(work, encoder, quick)
        images = 4 if quick else 256
        argv = [
            "--train_data_dir", str(data_dir), "--text_encoder_name_or_path", str(encoder),
            "--model_size", "tiny", "--resolution", "16" if quick else "32", "--output_dir", str(work / "out"),
            "--validation_split", "4" if quick else "0.02", "--eval_feature_model", str(dinov2), "--eval_clip_model", str(clip),
            "--eval_num_images", str(images), "--eval_batch_size", "16", "--logger", "none", "--seed", "0",
            "--ddpm_num_inference_steps", "2" if quick else "25",
        ]  # fmt: skip
        setup_seconds, run = timed(lambda: set_up_training(argv))
        outputs, checks = run.outputs, run.outputs.checks
        table = run.trainer.batches.source.table
        unet = run.accelerator.unwrap_model(run.trainer.unet)
        resolution = table.cache[0].shape[-1]
        reference_seconds, _ = timed(lambda: TrainingReference.from_table(table, resolution))
        with eval_mode(unet, None):
            validation_seconds, _ = timed(lambda: checks.validate(unet, outputs.noise_scheduler))
            grid_seconds, (samples, _) = timed(
                lambda: outputs.sample(unet, None, outputs.grids.prompts, outputs.grids.count, 0)
            )
            uint8 = to_uint8_batch(samples, resolution)
            nearest_seconds, _ = timed(lambda: checks.reference.memorization(uint8))
            quality_seconds, _ = timed(lambda: outputs.sample_quality(unet, None))
            generated = samples * (images // len(samples) + 1)
            measure_seconds, _ = timed(lambda: checks.quality.measure(generated[:images]))
    held_out = len(checks.validation.captions)
    rows = [
        ("setup: the whole run's (data, caption cache, models, and the parts below)", "once", setup_seconds),
        (f"training reference: {len(table.usable_rows)} images, copy threshold (leave-one-out)", "once", reference_seconds),
        (f"validation loss: {held_out} held-out images x {VALIDATION_BUCKETS} timestep buckets", "each evaluation", validation_seconds),
        (f"grid: {len(samples)} samples (for comparison: the cost without evaluation)", "each grid", grid_seconds),
        (f"memorization check of the grid: nearest of {len(samples)} samples among {len(table.usable_rows)}", "each grid", nearest_seconds),
        (f"FD + KID + CLIP score + copy rate: {images} samples generated and measured", "each --eval_steps", quality_seconds),
        (f"  of which DINOv2-small + CLIP-B/32 features and the maths on {images} images", "", measure_seconds),
    ]  # fmt: skip
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}",
        "",
        f"| evaluation part ({resolution} px, --model_size tiny UNet, DPM-Solver++ {outputs.grids.num_inference_steps} steps, guidance {outputs.grids.guidance_scale:g}) | when | seconds |",
        "|---|---|---|",
    ] + [f"| {name} | {when} | {seconds:.2f} |" for name, when, seconds in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    from text_to_image.config import MODEL_SIZES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, help="An imagefolder to train on (default: draw 720 shapes).")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per training row.")
    parser.add_argument("--quick", action="store_true", help="Tiny models and data: a smoke test in seconds.")
    parser.add_argument("--output", type=Path, help="Also write the table (of any mode) to this Markdown file.")
    parser.add_argument(
        "--model_sizes", action="store_true", help="Only time the --model_size UNets of --sizes (a table)."
    )
    parser.add_argument("--resolution", type=int, default=32, help="With --model_sizes: the image side.")
    parser.add_argument("--text_width", type=int, default=768, help="With --model_sizes: encoder width (CLIP-L 768).")
    parser.add_argument("--batch", type=int, help="With --model_sizes: images per step (8); with --step_ops: 1.")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="With --model_sizes: autocast dtype (default: fp32 on CPU, bf16 on Ampere+ GPUs, else fp16).",
    )
    parser.add_argument(
        "--evaluation", action="store_true", help="Only time the evaluation parts (validation, nearest, FD/KID)."
    )
    parser.add_argument(
        "--step_ops",
        action="store_true",
        help="Only count the ops one training step dispatches and its host ms, per --model_size (with --resolution,"
        " --batch, default 1, and --steps).",
    )
    parser.add_argument(
        "--memory_per_image",
        action="store_true",
        help="Only measure the memory one more image adds to a training step, per --model_size (with --resolution).",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(MODEL_SIZES),
        default=list(MODEL_SIZES),
        help="With --model_sizes, --step_ops, --memory_per_image: the --model_size UNets measured.",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return ""
    if args.evaluation:
        return report(evaluation_table(args.data_dir, args.quick), args.output)
    if args.step_ops:
        return report(step_ops_table(args.resolution, args.batch or 1, args.steps, args.sizes, args.quick), args.output)
    if args.memory_per_image:
        return report(memory_per_image_table(args.resolution, args.sizes), args.output)
    if args.model_sizes:
        table = model_sizes_table(
            args.resolution, args.text_width, args.batch or 8, args.steps, args.precision, args.sizes
        )
        return report(table, args.output)
    if args.quick:
        args.steps = 1
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="benchmark-") as work:
        work = Path(work)
        data_dir = prepare_data(args.data_dir, work, args.quick)
        captions = dataset_captions(data_dir)
        encoders = prepare_encoders(captions, work, args.quick)
        args.bf16 = measure_bf16(args.quick)
        configs = training_configs(args.quick, args.bf16)
        tasks = training_tasks(configs, data_dir, encoders, work, args)
        # sampling first: with --quick it is the longest task and runs beside the training rows
        sampled, *results = run_workers([sampling_task(configs, encoders, captions, args), *tasks], args.quick)
    separate = [] if args.quick else results[: sum(not config.get("speed_only") for config in configs)]
    group_setups, speeds = by_config(configs, results[len(separate) :])
    # --quick: each group's process's peak, for every row of it
    setups = setups_by_config(configs, separate) if separate else group_setups
    train, sample = training_rows(configs, setups, speeds), sampling_rows(sampled, args)
    return report(format_table(train, sample, args, time.perf_counter() - started, load), args.output)


def report(table: str, output: Path | None) -> str:
    """The table printed, and written to --output when given."""
    print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
