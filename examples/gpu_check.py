"""Everything only a GPU can show, in one call: a table of what ran, what failed and how fast.

    bash examples/gpu_check.sh                      # on the GPU machine: under 8 minutes on one H100
    bash examples/gpu_check.sh --cpu                # the same steps on CPU, smaller: a dry run (CI)

Rows: training steps in fp16 and bf16, with --channels_last, with --cuda_graphs (the batch and its
augmentation drawn inside the graph, data on the device) and with --torch_compile; train 2 steps,
checkpoint, resume with --use_ema and take a step (the EMA must follow the UNet to the GPU after
the checkpoint is loaded); a 2-process DDP run when there are two GPUs; xformers when installed;
the saved pipeline in float16 with enable_model_cpu_offload(); the benchmark's MFU table at
32 and 64 px for the default UNet sizes; and the throughput table (examples/throughput.py: img/s, MFU,
kernels per step, host against GPU ms of the trainer's own step per preset, resolution, batch and mode,
beside the trainer's logged images_per_second), given what is left of WHOLE_CHECK_S so the call ends
within 8 minutes. Needs no network: the data and the text encoder are drawn and built here, as the
quickstart does. The table goes to stdout and to --output; the MFU and throughput tables beside it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent
TRAINER = REPO / "train_text_to_image.py"
# the whole check on a GPU, in seconds: the device machine gives one call 8 minutes, and the throughput table,
# last, gets what the other rows left of this (at least THROUGHPUT_MIN_S)
WHOLE_CHECK_S = 440
THROUGHPUT_MIN_S = 60
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# what the rows' processes import, imported once by the fork server they start from (run_preloaded)
PRELOADED = ["train_text_to_image", "pipeline_text_to_image", "make_text_encoder", "benchmark"]


@dataclass
class Row:
    check: str
    result: str  # ok, FAILED or skipped
    detail: str
    seconds: float


def run(command: list[str], environment: dict | None = None, timeout: int = 600) -> tuple[bool, str, float]:
    """(succeeded, the output's last lines, seconds) of one subprocess."""
    started = time.perf_counter()
    env = dict(os.environ, **OFFLINE, **(environment or {}))
    command = [str(part) for part in command]
    try:
        if command[0] == sys.executable and not cuda_present():
            returncode, stdout, stderr = run_preloaded(command[1:], env, timeout)
        else:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
            returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - started
    # stdout last: the trainer's closing 'img/s' line must not be pushed out by stderr's progress bars
    output = (stderr + "\n" + stdout).strip().splitlines()
    return returncode == 0, "\n".join(output[-30:]), time.perf_counter() - started


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def run_preloaded(arguments: list[str], env: dict, timeout: int) -> tuple[int, str, str]:
    """`python *arguments` as a process forked from one that has imported torch and the trainer already: on a
    machine without CUDA (the dry run in CI) each of a dozen rows would otherwise spend 5-10 s importing them.
    A fork server, not a fork of this process: a process that has run OpenMP work hangs in its forked child."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    # read once, at the server's start: the modules it preloads read these variables when imported
    os.environ.update(OFFLINE)
    sys.path[:0] = [path for path in (str(REPO), str(EXAMPLES)) if path not in sys.path]
    context.set_forkserver_preload([*PRELOADED, "gpu_check"])
    # by its module's name: run as a script, this module is __main__, and __main__.run_script is no name in the child
    target = importlib.import_module("gpu_check").run_script
    with tempfile.TemporaryDirectory(prefix="gpu-check-row-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        process = context.Process(target=target, args=(arguments, env, os.getcwd(), stdout, stderr))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(arguments, timeout)
        return process.exitcode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")


def run_script(arguments: list[str], env: dict, cwd: str, stdout: Path, stderr: Path) -> None:
    """What `python *arguments` does (a script's path or -c code, then its arguments), in this process: its
    SystemExit, or an exception's traceback and exit status 1, are multiprocessing's as they are python's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for stream, path in ((sys.stdout, stdout), (sys.stderr, stderr)):
        stream.flush()
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), stream.fileno())
    sys.path[:0] = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    if arguments[0] == "-c":
        sys.argv = ["-c", *arguments[2:]]
        exec(compile(arguments[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = arguments
        sys.path.insert(0, str(Path(arguments[0]).resolve().parent))
        runpy.run_path(arguments[0], run_name="__main__")


def summary(output: str) -> str:
    """The trainer's closing 'img/s' figure, or the last line of an error."""
    rate = re.search(r"([\d.]+) img/s", output)
    if rate:
        return f"{rate.group(1)} img/s"
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    return (errors or output.splitlines() or ["no output"])[-1][:160]


def prepare(work: Path, resolution: int, count: int) -> tuple[Path, Path]:
    data, encoder = work / "shapes", work / "text-encoder"
    make_data = [sys.executable, EXAMPLES / "make_shapes_dataset.py", "--output_dir", data]
    ok, output, _ = run([*make_data, "--resolution", str(resolution), "--count", str(count)])
    if not ok:
        sys.exit(f"error: could not draw the shapes dataset:\n{output}")
    make_encoder = [sys.executable, EXAMPLES / "make_text_encoder.py", "--captions", data / "metadata.jsonl"]
    make_encoder += ["--output_dir", encoder, "--hidden_size", "128", "--num_layers", "2", "--num_heads", "4"]
    ok, output, _ = run([*make_encoder, "--max_length", "16"])
    if not ok:
        sys.exit(f"error: could not build the text encoder:\n{output}")
    return data, encoder


def trainer_flags(data: Path, encoder: Path, output: Path, resolution: int, batch: int, steps: int) -> list:
    return [
        "--train_data_dir", data, "--text_encoder_name_or_path", encoder, "--output_dir", output,
        "--resolution", resolution, "--model_size", "tiny", "--train_batch_size", batch,
        "--max_train_steps", steps, "--checkpointing_steps", steps, "--save_images_epochs", 1000,
        "--save_model_epochs", 1000, "--eval_batch_size", 4, "--ddpm_num_inference_steps", 4,
        "--logger", "none", "--seed", 0, "--overwrite_output_dir",
    ]  # fmt: skip


def train_row(name: str, flags: list, extra: list, skip: str | None = None, skip_rows: tuple = ()) -> Row:
    if any(pattern in name for pattern in skip_rows):
        skip = "--skip_rows"
    if skip:
        return Row(name, "skipped", skip, 0.0)
    ok, output, seconds = run([sys.executable, TRAINER, *flags, *extra])
    return Row(name, "ok" if ok else "FAILED", summary(output), seconds)


def resume_rows(flags_for, on_gpu: bool) -> list[Row]:
    """2 steps with EMA and a checkpoint, then resume and take one more: item 1 of issue 13 on a GPU. With
    --augment_prob, so the pipeline row samples a UNet with augmentation labels in float16."""
    precision = ["--mixed_precision", "bf16" if on_gpu else "no", "--augment_prob", "0.5"]
    first = train_row("train 2 steps with --use_ema, checkpoint", flags_for(2), ["--use_ema", *precision])
    ok, output, seconds = run(
        [sys.executable, TRAINER, *flags_for(3), "--use_ema", *precision, "--resume_from_checkpoint", "latest"]
    )
    resumed = "resumed from" in output and ok
    second = Row("resume --use_ema, 1 more step", "ok" if resumed else "FAILED", summary(output), seconds)
    return [first, second]


def ddp_row(flags: list, gpus: int) -> Row:
    if gpus < 2:
        why = "one GPU" if gpus == 1 else "needs two GPUs"
        return Row("2-process DDP", "skipped", f"{why} (tests/test_distributed.py runs it on CPU)", 0.0)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", TRAINER]
    ok, output, seconds = run([*launch, *flags])
    return Row("2-process DDP, bf16", "ok" if ok else "FAILED", summary(output), seconds)


PIPELINE_CHECK = """
import sys, torch
from pipeline_text_to_image import TextToImagePipeline
on_gpu = torch.cuda.is_available()
pipe = TextToImagePipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16 if on_gpu else torch.float32)
if on_gpu:
    pipe.enable_model_cpu_offload()
images = pipe(["a large red circle", "a small blue square"], num_inference_steps=8, output_type="np").images
assert images.shape[0] == 2 and images.min() >= 0 and images.max() <= 1, images.shape
print("2 images", images.shape[1:], "float16 + cpu offload" if on_gpu else "float32 (CPU)")
"""


def pipeline_row(model: Path, on_gpu: bool) -> Row:
    ok, output, seconds = run(
        [sys.executable, "-c", PIPELINE_CHECK, model],
        environment={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    name = (
        "pipeline: torch_dtype float16, enable_model_cpu_offload()" if on_gpu else "pipeline (CPU: float32, no offload)"
    )
    lines = output.splitlines()
    detail = next((line for line in lines if line.startswith("2 images")), lines[-1] if lines else "")
    return Row(name, "ok" if ok else "FAILED", detail[:160], seconds)


def mfu_rows(resolution: int, batch: int, steps: int, output: Path) -> Row:
    command = [sys.executable, EXAMPLES / "benchmark.py", "--model_sizes", "--resolution", resolution]
    ok, text, seconds = run([*command, "--batch", batch, "--steps", steps])
    if ok:
        output.write_text(text + "\n")
        cells = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "M |" in line]
        detail = ", ".join(f"{cell[0].strip('| ')} {cell[5].strip(' |')}" for cell in cells)
        return Row(f"MFU at {resolution} px, batch {batch} ({output.name})", "ok", detail, seconds)
    return Row(f"MFU at {resolution} px", "FAILED", text.splitlines()[-1][:160] if text else "", seconds)


def throughput_row(output: Path, work: Path, on_gpu: bool, budget_s: float, skip_rows: tuple = ()) -> Row:
    """examples/throughput.py in its own process (its CUDA graphs and compiled code end with it)."""
    name = f"throughput table ({output.name})"
    if any(pattern in name for pattern in skip_rows):
        return Row(name, "skipped", "--skip_rows", 0.0)
    command = [sys.executable, EXAMPLES / "throughput.py", "--output", output, "--work_dir", work]
    command += ["--budget_s", f"{budget_s:.0f}", *([] if on_gpu else ["--cpu"])]
    # past its budget only by a row that overran its estimate (the table, written after each row, stays); the
    # margin keeps the whole check within the device machine's 8 minutes
    ok, text, seconds = run(command, timeout=int(budget_s) + 30)
    last = next((line for line in reversed(text.splitlines()) if line.startswith("throughput:")), None)
    detail = last.removeprefix("throughput: ") if ok and last else summary(text)
    return Row(name, "ok" if ok else "FAILED", detail[:200], seconds)


def format_table(rows: list[Row], device: str) -> str:
    lines = [f"gpu_check on {device}", "", "| check | result | detail | seconds |", "|---|---|---|---|"]
    lines += [f"| {row.check} | {row.result} | {row.detail} | {row.seconds:.0f} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="A dry run on CPU: same steps, tiny sizes, GPU-only rows skipped."
    )
    parser.add_argument("--output", type=Path, default=Path("gpu_check.md"), help="Where the table is written.")
    parser.add_argument("--work_dir", type=Path, help="Keep the data and runs here (default: a temporary folder).")
    parser.add_argument(
        "--mfu_resolutions", type=int, nargs="*", default=[32, 64], help="Resolutions of the MFU tables (none: skip)."
    )
    parser.add_argument(
        "--skip_rows",
        nargs="*",
        default=[],
        help="Skip the training rows whose name contains one of these (e.g. to rerun the rest on a device).",
    )
    parser.add_argument(
        "--throughput_budget_s",
        type=float,
        help=f"Seconds for the throughput table (default: on a GPU what the other rows left of {WHOLE_CHECK_S} s,"
        f" at least {THROUGHPUT_MIN_S}; on the CPU 120).",
    )
    args = parser.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    if not on_gpu and not args.cpu:
        sys.exit("error: no CUDA GPU is visible; run with --cpu for the dry run")
    device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if on_gpu else "CPU (dry run)"
    resolution, batch, steps = (32, 64, 30) if on_gpu else (16, 4, 2)
    gpus = torch.cuda.device_count() if on_gpu else 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        data, encoder = prepare(work, resolution, 512 if on_gpu else 32)

        def row(name: str, flags: list, extra: list, skip: str | None = None) -> Row:
            return train_row(name, flags, extra, skip, tuple(args.skip_rows))

        def flags_for(count: int, name: str = "run") -> list:
            return trainer_flags(data, encoder, work / name, resolution, batch, count)

        no_gpu = None if on_gpu else "needs a GPU"
        native_bf16 = on_gpu and torch.cuda.get_device_capability() >= (8, 0)
        compile_ok = on_gpu and torch.cuda.get_device_capability() >= (7, 0)
        # the dry run takes the same steps in fp32: CPU has no fp16, and its bf16 may be emulated
        half = "bf16" if native_bf16 else "fp16"
        rows = [
            row("train fp16", flags_for(steps, "fp16"), ["--mixed_precision", "fp16"], no_gpu),
            row("train bf16" if on_gpu else "train (CPU: fp32)", flags_for(steps, "bf16"),
                      ["--mixed_precision", "bf16" if on_gpu else "no"],
                      None if native_bf16 or not on_gpu else "no native bf16 (compute capability < 8.0)"),
            row(f"train {half if on_gpu else 'fp32'} --channels_last", flags_for(steps, "channels_last"),
                      ["--mixed_precision", half if on_gpu else "no", "--channels_last"]),
            row(f"train {half if on_gpu else 'fp32'}, small-dataset flags", flags_for(steps, "small"),
                      ["--mixed_precision", half if on_gpu else "no", "--augment_prob", "0.5", "--random_flip",
                       "--alpha_background", "random", "--input_perturbation", "0.1",
                       "--caption_shuffle_separator", " ", "--channels_last"]),
            # one CUDA graph per step, the batch drawn inside it from the data on the device (--data_on_device
            # auto), with every draw the small-dataset flags add, checkpointed and exported at the end
            row("train bf16 --cuda_graphs, small-dataset flags" if on_gpu else "train fp32 --cuda_graphs (CPU: eager), small-dataset flags",
                      flags_for(steps, "graphs"),
                      ["--mixed_precision", "bf16" if on_gpu else "no", "--cuda_graphs", "--augment_prob", "0.5",
                       "--random_flip", "--alpha_background", "random", "--caption_shuffle_separator", " "],
                      None if native_bf16 or not on_gpu else "needs bf16 (compute capability >= 8.0)"),
            row(f"train {half} --torch_compile", flags_for(steps, "compile"),
                      ["--mixed_precision", half, "--torch_compile"],
                      None if compile_ok else "needs a GPU of compute capability >= 7.0"),
            *resume_rows(lambda count: flags_for(count, "resume"), on_gpu),
            ddp_row(flags_for(steps, "ddp"), gpus),
        ]  # fmt: skip
        xformers = importlib.util.find_spec("xformers") is not None
        rows.append(
            row(
                "train with xformers attention",
                flags_for(steps, "xformers"),
                ["--enable_xformers_memory_efficient_attention", "--mixed_precision", "fp16"],
                None if xformers and on_gpu else "xformers not installed" if on_gpu else "needs a GPU",
            )
        )
        rows.append(pipeline_row(work / "resume", on_gpu))
        mfu_batches = {32: 128, 64: 64}
        mfu_settings = (
            [(size, mfu_batches.get(size, 64), 10) for size in args.mfu_resolutions] if on_gpu else [(16, 2, 1)]
        )
        for size, mfu_batch, mfu_steps in mfu_settings:
            rows.append(
                mfu_rows(size, mfu_batch, mfu_steps, args.output.with_name(f"{args.output.stem}-mfu-{size}px.md"))
            )
        left = max(THROUGHPUT_MIN_S, WHOLE_CHECK_S - (time.perf_counter() - started)) if on_gpu else 120
        throughput = args.output.with_name(f"{args.output.stem}-throughput.md")
        budget = args.throughput_budget_s or left
        rows.append(throughput_row(throughput, work / "throughput", on_gpu, budget, tuple(args.skip_rows)))
    table = format_table(rows, device) + f"\n\nWhole check: {time.perf_counter() - started:.0f} s."
    print(table)
    args.output.write_text(table + "\n")
    return 1 if any(row.result == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
