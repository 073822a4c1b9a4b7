"""``make gpu-check``'s dry run: every step runs in the CUDA simulator, or says why it cannot."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

from tools.bench import gpu_check  # noqa: E402

# What the dry run does with each step: the hardware-only ones are skipped.
EXPECTED = {
    "versions": "passed",
    "tests-cuda": "skipped",
    "tests-semantic": "skipped",
    "nan-probe": "passed",
    "kernels": "passed",
    "racecheck": "skipped",
    "memcheck": "skipped",
    "repeat": "passed",
    "sync-batchnorm": "passed",
    "benchmark": "passed",
    "host-time": "passed",
    "cpu-threads": "passed",
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    command = [sys.executable, "-m", "tools.bench.gpu_check", "--out", str(out), "--dry-run"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=gpu_check.ROOT, check=False
    )
    return out, result


def _summary_rows(text: str) -> dict[str, list[str]]:
    """The summary table's rows by step: status, seconds, budget, note."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| step |"):
            step, *cells = (cell.strip() for cell in line.strip("|").split("|"))
            rows[step] = cells
    return rows


@pytest.mark.slow
def test_dry_run_lists_every_step_with_its_status(dry_run):
    out, result = dry_run
    report = out / gpu_check.REPORT
    shown = report.read_text() if report.exists() else result.stdout[-5000:]
    assert result.returncode == 0, shown + result.stderr[-3000:]
    rows = _summary_rows((out / gpu_check.SUMMARY).read_text())
    assert {step: cells[0] for step, cells in rows.items()} == EXPECTED
    assert list(rows) == gpu_check.STEP_NAMES
    for step, (status, seconds, _, note) in rows.items():
        assert float(seconds) > 0, step
        if status == "skipped":
            assert "needs a GPU" in note, step


@pytest.mark.slow
def test_dry_run_leaves_few_enough_files_for_a_lent_machine(dry_run):
    out, _ = dry_run
    left = sorted(path.relative_to(out).as_posix() for path in out.rglob("*"))
    assert all((out / name).is_file() for name in left), left
    assert len(left) <= gpu_check.MAX_FILES - 2, left  # the GPU run adds two JUnit files


@pytest.mark.slow
def test_dry_run_report_has_every_section_and_table(dry_run):
    out, result = dry_run
    report = (out / gpu_check.REPORT).read_text()
    for step in gpu_check.STEPS:
        assert f"## {step.title}\n" in report
    tables = [
        "| component | version |",
        "| channel | scenario |",
        "| case | MB | stream GB/s | pass |",
        "| case | numbabn | numbabn out= |",
        "| threads | numbabn ms | speed-up |",
    ]
    for header in tables:
        assert header in report
    assert "All 15 outputs match the CPU backend" in report
    log = (out / gpu_check.LOG).read_text()
    assert log.splitlines()[-1].startswith("done in ")
    assert "| arrays | status | seconds | note |" in report
    n = len(gpu_check.STEPS)
    assert f"[{n}/{n}] cpu-threads: passed" in log
    assert f"[{n}/{n}] cpu-threads: passed" in result.stdout


def test_test_steps_run_files_that_exist():
    for name, (files, _) in gpu_check.TEST_RUNS.items():
        command = gpu_check.pytest_command(name, gpu_check.ROOT / "report.xml")
        assert "--junitxml=" + str(gpu_check.ROOT / "report.xml") in command
        for file in files:
            assert (gpu_check.ROOT / file).is_file(), file


def test_the_sanitizers_workload_runs_every_kernel_family():
    """kernel_calls' layouts give the reductions of every family, at the real block sizes;
    each layout runs the fused backward among its passes."""
    from numbabn._cuda.kernels import Family
    from tools.bench import kernel_calls

    found = set()
    for layout, (wanted, shape) in kernel_calls.LAYOUTS.items():
        x = kernel_calls._data(shape or kernel_calls.DEFAULT_SHAPE, layout, 0)
        assert kernel_calls.family(x) == wanted, layout
        found.add(wanted)
    assert found == {family.name.lower() for family in Family}
    calls = kernel_calls.passes((2, 3, 2, 2), "planar")
    assert "train relu(bn + residual) backward" in calls


def test_budgets_leave_room_in_eight_minutes():
    assert sum(step.budget for step in gpu_check.STEPS) <= 450


def test_a_step_past_its_deadline_is_stopped_and_reported(tmp_path):
    (tmp_path / gpu_check.STEP_RESULTS).mkdir()
    log = gpu_check.Log(tmp_path / gpu_check.LOG)
    # A step of several simulated launches: seconds, where a step always gets at least one.
    step = gpu_check.STEPS[gpu_check.STEP_NAMES.index("kernels")]
    start = time.time()
    outcome = gpu_check._run_step_process(step, tmp_path, True, start + 0.1, log)
    log.close()
    assert outcome.status == "failed"
    assert outcome.note == f"stopped at its time budget ({step.budget:.0f} s)"
    assert time.time() - start < 1 + gpu_check.GRACE_SECONDS + 2


def test_probe_inputs_hold_one_scenario_per_channel():
    inputs = gpu_check._probe_inputs((3, 16, 2, 2), "float32", True)
    for channel, (label, entries) in enumerate(gpu_check.PROBE_SCENARIOS):
        names = {name for name, _, _ in entries}
        for name, values in inputs.items():
            in_channel = np.take(values, channel, axis=1 if values.ndim > 1 else 0)
            assert np.isfinite(in_channel).all() == (name not in names), (label, name)


def test_probe_comparison_finds_a_dropped_nan_and_a_changed_value():
    cpu = np.zeros((2, 3, 2), np.float32)
    cpu[0, 1, 0] = np.nan
    gpu = np.zeros_like(cpu)
    assert gpu_check._differing_channels(cpu, gpu) == [1]
    assert gpu_check._describe(cpu[:, 1]) == "NaN 1, finite 3"
    gpu[0, 1, 0], gpu[1, 2, 1] = np.nan, 1e-3
    assert gpu_check._differing_channels(cpu, gpu) == [2]
    assert gpu_check._differing_channels(np.array([np.inf, 1.0]), np.array([-np.inf, 1.0])) == [0]


def test_a_failed_versions_step_stops_the_run_and_the_summary_is_printed_last(
    tmp_path, monkeypatch, capsys
):
    ran = []

    def run_step(step, out, dry_run, deadline, log):
        ran.append(step.name)
        return gpu_check.Outcome("failed", "numbabn's CUDA modules do not import: n/a (...)")

    monkeypatch.setattr(gpu_check, "_run_step_process", run_step)
    assert gpu_check.run_all(tmp_path, True, ["versions", "kernels", "benchmark"]) == 1
    assert ran == ["versions"]
    rows = _summary_rows((tmp_path / gpu_check.SUMMARY).read_text())
    assert [cells[0] for cells in rows.values()] == ["failed", "skipped", "skipped"]
    assert rows["kernels"][3].startswith("not run: the versions step failed")
    printed = capsys.readouterr().out
    assert printed.endswith((tmp_path / gpu_check.SUMMARY).read_text())


def test_test_steps_report_warnings_rather_than_fail_on_them():
    command = gpu_check.pytest_command("tests-cuda", gpu_check.ROOT / "report.xml")
    assert command[command.index("-W") + 1] == "default"
