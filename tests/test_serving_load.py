"""`nar-diffusers serve-benchmark` at toy size: real `serve` processes on localhost, every request answered."""

import json


from conftest import make_pipeline
from nar_diffusers.commands.cli import main


def test_load_benchmark_answers_every_request_and_reports_each_mode(tmp_path):
    model = tmp_path / "tiny"
    make_pipeline().save_pretrained(model, safe_serialization=True)
    report_path = tmp_path / "report.json"
    code = main(["serve-benchmark", "--model", str(model), "--modes", "single", "continuous", "--requests", "4",
                 "--rates", "2", "--lone-repeats", "1", "--overload", "30", "--overload-queue", "2", "--threads", "1",
                 "--json", str(report_path)])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["modes"]) == {"single", "continuous"}
    for entry in report["modes"].values():
        run = entry["runs"][0]
        assert run["requests"] == 4 and run["ok"] == 4 and run["requests_per_s"] > 0
        assert run["p50_s"] <= run["p99_s"]
    overload = report["modes"]["continuous"]["overload"]
    assert overload["requests"] == 30 and overload["lost"] == 0 and overload["server_errors"] == 0
    assert set(overload["statuses"]) <= {"200", "429", "422", "504"}
    assert "| continuous | 2 |" in report["table"]
