"""The throughput table (examples/throughput.py): the trainer's own step timed per row, what did not run named,
the trainer's logged images_per_second beside it. On the CPU here; the GPU run takes the same jobs, larger."""

from __future__ import annotations

import argparse

import gpu_check
import pytest
import throughput


def table_cells(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the Markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(header_start))
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        body.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return [cell.strip() for cell in lines[start].strip("|").split(" | ")], body


def figure(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.slow
def test_cpu_dry_run_times_the_trainers_rows_names_the_skipped_and_compares_the_trainers_own_figure(tmp_path):
    output = tmp_path / "gpu_check-throughput.md"
    # through gpu_check's row: the command line the GPU run gets, with --cpu
    # a budget no row of the dry run needs: rows skipped for time on a busy machine would fail the counts below
    row = gpu_check.throughput_row(output, tmp_path / "work", on_gpu=False, budget_s=900)
    assert row.result == "ok", row.detail
    assert row.detail.startswith("4 of 8 rows measured, 4 skipped: needs a GPU; the trainer's own figure within")

    text = output.read_text()
    assert text.startswith("Throughput of the trainer's own step: CPU dry run")
    header, rows = table_cells(text, "| --model_size | px | batch | mode | result | img/s |")
    assert header[8] == "ops per step (CPU: benchmark.OpCounter, not kernels)"
    assert header[10] == "GPU ms per step (none on the CPU)"
    expected = [
        (preset, "16", batch, mode)
        for preset in ("tiny", "small")
        for batch in ("2",)
        for mode in ("eager", "compile", "graphed", "compile + graphed")
    ]
    assert [tuple(cells[:4]) for cells in rows] == expected
    for cells in rows:
        values = dict(zip(header, cells, strict=True))
        if "compile" in values["mode"]:
            assert values["result"] == "skipped: needs a GPU" and values["img/s"] == "–"
            continue
        assert values["result"] == "ok"
        for column in ("img/s", "GFLOP/image", header[8], "host ms per step", "wall ms per step"):
            assert figure(values[column]) > 0, (column, cells)
        assert values["MFU"].endswith("%") and float(values["MFU"][:-1]) > 0
        assert values[header[10]] == "–"
        # on the CPU nothing waits for a device: the step's host time is its wall time, but for the loop between
        # steps and, on a busy machine, the moments the process waited for a core (2.3 ms of ~60 seen, 3 workers)
        host, wall = figure(values["host ms per step"]), figure(values["wall ms per step"])
        assert host <= wall and wall - host <= max(1, 0.1 * wall)
        graphed_note = "--cuda_graphs needs CUDA: the trainer stepped eagerly"
        assert values["note"] == (graphed_note if values["mode"] == "graphed" else "")
    # a bigger UNet costs more per image
    flops = {(cells[0], cells[3]): float(cells[6]) for cells in rows if cells[4] == "ok"}
    assert flops["small", "eager"] == flops["small", "graphed"] > flops["tiny", "eager"] == flops["tiny", "graphed"]

    header, figures = table_cells(text, "| --model_size | px | batch | mode | result | trainer's images_per_second |")
    assert [tuple(cells[:5]) for cells in figures] == [("tiny", "16", "2", mode, "ok") for mode in ("eager", "graphed")]
    for cells in figures:
        assert cells[5].endswith("(steps 4, 6)")  # the logs after the first interval (compile, capture)
        logged, table, ratio = float(cells[5].split()[0]), float(cells[6]), float(cells[7].split()[0])
        assert logged > 0 and table > 0
        # the ratio of the unrounded rates; the table shows them to 0.1 img/s
        assert abs(ratio - logged / table) < 0.01 + 0.05 * (1 + ratio) / table
        # judged on the ratio as printed (0.85 is within), so the float rounding of 1 - 0.85 cannot flip it
        assert cells[7].endswith("(within 15%)" if round(abs(ratio - 1), 2) <= 0.15 else "(off by more than 15%)")


def gpu_grid() -> throughput.Grid:
    return throughput.grid_for(True, argparse.Namespace(presets=None, resolutions=None, batches=None, steps=None))


def test_gpu_jobs_run_eager_and_graphed_at_32_px_and_the_trainers_figures_first_and_compile_modes_later():
    jobs = throughput.job_order(gpu_grid())
    assert len([job for job in jobs if job[0] == "row"]) == 4 * 2 * 4 * 4  # presets x px x batches x modes
    first = [(kind, s.preset, s.resolution, s.batch, s.mode) for kind, s in jobs[:16]]
    assert first[:8] == [
        ("row", preset, 32, 128, mode) for preset in ("tiny", "small", "base", "large") for mode in ("eager", "graphed")
    ]
    assert first[8:] == [("trainer", *job[1:]) for job in first[:8]]
    settings = [s for kind, s in jobs if kind == "row"]
    at_32 = settings[: len(settings) // 2]
    assert {s.resolution for s in at_32} == {32}
    first_compiled = next(index for index, s in enumerate(at_32) if s.compiles())
    assert all(not s.compiles() for s in at_32[:first_compiled]) and all(s.compiles() for s in at_32[first_compiled:])
    assert [s.batch for s in at_32[:first_compiled:8]] == [128, 256, 512, 1024]


def test_a_row_that_does_not_fit_the_budget_is_listed_not_run(tmp_path):
    grid = gpu_grid()
    place = throughput.Place(data=tmp_path, encoder=tmp_path, work=tmp_path, on_gpu=True, peak=None, device="a GPU")
    compiled = throughput.Setting("tiny", 32, 128, "compile")
    measured = throughput.Measured(
        images_per_second=1000.0,
        flops_per_image=3e9,
        mfu=None,
        kernels_per_step=2000.0,
        host_ms=100.0,
        device_ms=20.0,
        wall_ms=128.0,
        setup_s=3.0,
        first_steps_s=60.0,
        note="",
    )
    rows = [throughput.Row(compiled, "ok", measured, 70.0)]
    # the same preset and mode at 8x the pixels: setup and compile as measured, 28 steps of 8 x 0.128 s
    bigger = throughput.Setting("tiny", 64, 256, "compile")
    expected = throughput.expected_seconds(bigger, rows, grid, on_gpu=True)
    assert abs(expected - (3 + 60 + 1.2 * 28 * 8 * 0.128)) < 1e-6
    budget = throughput.Budget(expected - 1)
    row = throughput.table_row(bigger, grid, place, budget, rows, {})
    assert (row.result, row.measured) == ("skipped: time budget", None)
    figure = throughput.trainer_figure(compiled, grid, place, throughput.Budget(1.0), [])
    assert figure.result == "skipped: time budget"


def test_kernels_are_counted_apart_from_copies_and_annotation_spans():
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(name, start, end, device=DeviceType.CUDA, kind=None, annotation=False):
        return FunctionEvent(
            id=0,
            name=name,
            thread=0,
            start_us=start,
            end_us=end,
            device_type=device,
            activity_type=kind,
            is_user_annotation=annotation,
        )

    events = [
        event("ampere_bf16_gemm", 0, 10, kind="kernel"),
        event("Memcpy HtoD (Pinned -> Device)", 10, 12, kind="gpu_memcpy"),
        event("Torch-Compiled Region", 0, 30, kind="gpu_user_annotation"),
        event("aten::mm", 0, 40, device=DeviceType.CPU, kind="cpu_op"),
        event("vectorized_elementwise_kernel", 12, 15),  # a torch whose events do not say their kind
        event("Memset (Device)", 15, 16),
        event("ProfilerStep#1", 0, 50, annotation=True),
    ]
    assert throughput.device_work(events) == (2, 10 + 2 + 3 + 1)
