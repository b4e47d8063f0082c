"""launch/gpu_check.sh, the one script for a short GPU slot: its plan fits the slot, and every part runs (at toy size,
on the CPU) and writes its row into a copy of docs/benchmarks.md, never into the committed page."""
import re
import subprocess

from helpers import REPO

from mimtrain.bench.gpu_check import BEGIN, BUDGET_S, families_covered

SCRIPT = ["bash", str(REPO / "launch" / "gpu_check.sh")]


def test_dry_run_states_each_cap_and_a_total_within_the_slot():
    proc = subprocess.run([*SCRIPT, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    caps = [int(c) for c in re.findall(r"^[a-f]\. \[\s*(\d+) s\]", proc.stdout, re.M)]
    assert re.findall(r"^([a-f])\.", proc.stdout, re.M) == list("abcdef")  # most valuable first, as the issue lists
    total = int(re.search(r"^total: (\d+) s of commands after the install", proc.stdout, re.M).group(1))
    assert total == sum(caps) <= BUDGET_S == 600
    assert "train.compile=true" in proc.stdout and proc.stdout.count("train.compile=true") == 1  # one compile


def test_every_registered_family_gets_its_bf16_step():
    covered, registered = families_covered()
    assert registered and covered == registered


def test_cpu_smoke_runs_every_part_and_writes_a_copy_of_the_page(tmp_path):
    page = (REPO / "docs" / "benchmarks.md").read_text()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(page)
    proc = subprocess.run([*SCRIPT, "--cpu-smoke", "--doc", str(doc), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert (REPO / "docs" / "benchmarks.md").read_text() == page  # the committed page is untouched
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    block = doc.read_text().split(BEGIN, 1)[1]
    rows = [line for line in block.splitlines() if re.match(r"^\| [a-f]\. ", line)][:6]
    assert [r[2] for r in rows] == list("abcdef")
    assert all("| ok |" in r for r in rows), rows
    assert "ours/HF" in rows[0] and "8/8 families stepped in bf16" in rows[3] and "data wait" in rows[4]
