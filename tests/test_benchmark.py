"""The benchmark script runs end to end in its quick mode and prints the table the docs quote."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

ROW = re.compile(
    r"^\| (?P<name>[^|]+) \| (?P<rate>[\d.]+) \| (?P<ratio>[\d.]+)x \| (?P<time>[\d.]+)( s)? \| (?P<rss>\d+) \|$"
)


@pytest.mark.slow
def test_quick_benchmark_prints_every_row_with_numbers(tmp_path):
    output = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "benchmark.py"), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {match["name"]: match for line in result.stdout.splitlines() if (match := ROW.match(line))}
    assert list(rows) == [
        "(a) seed config, no caching, captions padded to 77 tokens (the seed's way)",
        "(a) seed config, cached",
        "(a) seed config, cached + bf16",
        "(b) small config, no caching, captions padded to 77 tokens (the seed's way)",
        "(b) small config, cached",
        "16 prompts, 1000 DDPM steps each, one at a time (the seed's way)*",
        "16-image grid, one batch, DPM-Solver++ 2 steps, guidance 3",
        "16-image grid, one batch, DPM-Solver++ 2 steps, no guidance (as the seed)",
        "16-image grid, one batch, DPM-Solver++ 2 steps, guidance 3, bf16 autocast",
    ]
    assert all(float(row["rate"]) > 0 and int(row["rss"]) > 0 for row in rows.values())
    assert rows["(a) seed config, no caching, captions padded to 77 tokens (the seed's way)"]["ratio"] == "1.00"
    assert output.read_text().strip() == result.stdout.strip()


@pytest.mark.slow
def test_model_sizes_table_gives_flops_per_image_achieved_flops_and_mfu():
    import benchmark

    table = benchmark.model_sizes_table(resolution=16, text_width=64, batch=2, steps=1)
    assert "peak" in table.splitlines()[0] and "TFLOP/s fp32" in table.splitlines()[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "M |" in line]
    assert [row[0].strip("| ") for row in rows] == ["tiny", "small", "base", "large"]
    flops = [float(row[3]) for row in rows]
    assert flops == sorted(set(flops))  # bigger UNets cost more per image
    for row in rows:
        achieved, mfu = float(row[4]), row[5].strip(" |")
        assert achieved > 0 and mfu.endswith("%") and float(mfu[:-1]) > 0
    assert (
        benchmark.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and benchmark.gpu_peak_flops("Tesla P100") is None
    )


def test_model_sizes_times_only_the_sizes_asked_for_and_writes_the_table_to_output(tmp_path, capsys):
    import benchmark

    output = tmp_path / "tables" / "sizes.md"
    flags = ["--resolution", "16", "--text_width", "64", "--batch", "2", "--steps", "1"]
    table = benchmark.main(["--model_sizes", "--sizes", "tiny", *flags, "--output", str(output)])
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ") and "M |" in line]
    assert rows == ["tiny"]
    assert output.read_text() == table + "\n" and capsys.readouterr().out == table + "\n"


def test_an_unknown_size_is_refused_in_one_line(capsys):
    import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--model_sizes", "--sizes", "huge"])
    assert "argument --sizes: invalid choice: 'huge'" in capsys.readouterr().err


def test_gpu_peak_tells_the_h100_and_h200_variants_apart():
    import benchmark

    # torch.cuda.get_device_name() of each card: dense bf16 TFLOP/s from the spec sheets
    peaks = {
        "NVIDIA H100 PCIe": 756,
        "NVIDIA H100 80GB HBM3": 989,  # SXM
        "NVIDIA H100 NVL": 835,
        "NVIDIA H200": 989,
        "NVIDIA H200 NVL": 835,
        "NVIDIA L40S": 362,
        "NVIDIA L4": 121,
    }
    assert {name: benchmark.gpu_peak_flops(name) / 1e12 for name in peaks} == peaks


def test_evaluation_benchmark_times_every_part_in_seconds():
    import benchmark

    table = benchmark.evaluation_table(None, quick=True)
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "seconds" not in line]
    assert len(rows) == 7
    assert all(float(row[-1].rstrip(" |")) >= 0 for row in rows)
    assert "4 held-out images x 10 timestep buckets" in table


def test_step_ops_table_shows_a_graphed_step_leaves_the_host_almost_nothing():
    import benchmark

    table = benchmark.step_ops_table(resolution=16, batch=1, steps=1, sizes=["tiny"], quick=True)
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 and len(rows[0]) == 10
    eager, data, ema, eager_ms, resident, resident_ms, in_graph, graphed_host, graphed_ms = (
        float(cell.replace(",", "")) for cell in rows[0][1:]
    )
    assert 0 < data < eager and 0 < ema < eager and eager_ms > 0 and resident_ms > 0
    assert abs(in_graph - resident) < 0.05 * resident  # the captured step runs the eager step's kernels
    assert graphed_host < 20 and graphed_ms < eager_ms / 10  # and the host only copies rows and scalars in


@pytest.mark.slow
def test_memory_per_image_table_measures_a_positive_figure_per_size():
    import benchmark

    table = benchmark.memory_per_image_table(resolution=16, sizes=["tiny"])
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1 and float(rows[0][1]) > 0
