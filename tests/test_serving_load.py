"""The load benchmarks at toy size: `nar-diffusers serve-benchmark` (real `serve` processes on localhost, every
request answered) and the in-process engine benchmark (`benchmarks/serving_in_process.py`)."""

import json
import runpy
import sys
from pathlib import Path

from conftest import make_pipeline
from nar_diffusers.commands.cli import main

REPO = Path(__file__).parents[1]


def test_load_benchmark_answers_every_request_and_reports_each_mode(tmp_path):
    model = tmp_path / "tiny"
    make_pipeline().save_pretrained(model, safe_serialization=True)
    report_path = tmp_path / "report.json"
    code = main(["serve-benchmark", "--model", str(model), "--modes", "single", "continuous", "--requests", "4",
                 "--rates", "2", "--lone-repeats", "1", "--overload", "30", "--overload-queue", "2", "--threads", "1",
                 "--overload-warmup", "20", "--json", str(report_path)])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["modes"]) == {"single", "continuous"}
    for entry in report["modes"].values():
        run = entry["runs"][0]
        assert run["requests"] == 4 and run["ok"] == 4 and run["requests_per_s"] > 0
        assert run["p50_s"] <= run["p99_s"]
    overload = report["modes"]["continuous"]["overload"]
    assert overload["requests"] == 30 and overload["lost"] == 0 and overload["server_errors"] == 0
    assert overload["warm_up_requests"] == 20 and overload["rss_before_mib"] > 0
    assert set(overload["statuses"]) <= {"200", "429", "422", "504"}
    assert "| continuous | 2 |" in report["table"]


def test_in_process_benchmark_compares_the_engine_with_pipeline_calls(tmp_path, monkeypatch, capsys):
    model = tmp_path / "tiny"
    make_pipeline().save_pretrained(model, safe_serialization=True)
    argv = ["serving_in_process.py", "--model", str(model), "--max-batch", "2", "--requests", "3", "--rounds", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "benchmarks" / "serving_in_process.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]  # after the header
    assert len(rows) == 3
    assert rows[0].startswith("| pipeline, one output per call |") and rows[0].endswith("| 1.00x |")
    assert rows[1].startswith("| pipeline, 2 per call |") and rows[2].startswith("| engine, 2 slots busy (")
    for row in rows:
        assert float(row.split(" | ")[1]) > 0  # ms / output
