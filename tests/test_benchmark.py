"""The benchmark script runs end to end in its quick mode and prints the table the docs quote."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

ROW = re.compile(
    r"^\| (?P<name>[^|]+) \| (?P<rate>[\d.]+) \| (?P<ratio>[\d.]+)x \| (?P<time>[\d.]+)( s)? \| (?P<rss>\d+) \|$"
)


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
