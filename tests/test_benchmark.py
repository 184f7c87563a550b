"""`nar-diffusers benchmark` smoke runs at toy sizes: the report's fields, never its timings."""

import json

from conftest import make_pipeline

from nar_diffusers.commands.cli import main

TINY = ["--model-size", "2/4/32", "--vocab-size", "32", "--num-classes", "4", "--device", "cpu", "--warmup", "0",
        "--repeats", "1"]  # fmt: skip


def _benchmark(tmp_path, *extra: str) -> dict:
    path = tmp_path / "report.json"
    assert main(["benchmark", *TINY, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_nar_and_raster_eager_and_static_in_one_run(tmp_path, capsys):
    report = _benchmark(tmp_path, "--grid", "2", "3", "--batch-sizes", "1", "2", "--decode", "eager", "static")
    rows = report["results"]
    assert {(r["order"], r["decode"], r["batch_size"]) for r in rows} == {
        (order, decode, batch) for order in ("nar", "raster") for decode in ("eager", "static") for batch in (1, 2)
    }
    for row in rows:
        assert row["forward_passes"] == (4 if row["order"] == "nar" else 6)
        assert row["seconds_median"] > 0 and len(row["seconds_all"]) == 1 and row["images_per_second"] > 0
        assert row["peak_memory_mib"] > 0 and row["memory_kind"] == "process_peak_rss"
    ratios = [c for c in report["comparisons"] if "wall_ratio" in c]
    assert len(ratios) == 4 and all(c["step_ratio"] == 1.5 for c in ratios)
    assert all(c["fraction_of_step_ratio"] == c["wall_ratio"] / 1.5 for c in ratios)
    assert {c["decode"] for c in report["comparisons"] if "speedup_over_eager" in c} == {"static"}
    assert report["model"]["grid"] == [2, 3] and report["environment"]["device"] == "cpu"
    assert report["command"].startswith("nar-diffusers benchmark")
    out = capsys.readouterr().out
    assert "NAR/raster wall ratio" in out and "step ratio" in out


def test_video_grid_with_learned_positions(tmp_path):
    report = _benchmark(tmp_path, "--grid", "2", "2", "2", "--orders", "nar", "--position-embedding", "learned",
                        "--guidance-scale", "1", "--greedy", "--batch-sizes", "1")  # fmt: skip
    (row,) = report["results"]
    assert row["forward_passes"] == 4 and report["comparisons"] == []


def test_saved_pipeline_gets_a_raster_twin_of_the_same_size(tmp_path):
    folder = tmp_path / "pipe"
    make_pipeline().save_pretrained(folder)
    path = tmp_path / "report.json"
    assert main(["benchmark", "--model", str(folder), "--device", "cpu", "--warmup", "0", "--repeats", "1",
                 "--batch-sizes", "1", "--json", str(path)]) == 0  # fmt: skip
    report = json.loads(path.read_text())
    assert report["model"]["grid"] == [4, 4]
    passes = {r["order"]: r["forward_passes"] for r in report["results"]}
    assert passes == {"nar": 7, "raster": 16}
    # The raster twin has one block less (no second head's block) and one head less.
    assert report["model"]["nar_parameters"] > report["model"]["raster_parameters"]


def test_bad_arguments_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["benchmark", *TINY, "--grid", "3"]) == 2
    assert "--grid" in capsys.readouterr().err
    assert main(["benchmark", *TINY, "--batch-sizes", "0"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["benchmark", "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a saved pipeline folder" in capsys.readouterr().err
    assert main(["benchmark", "--model-size", "GPT-Q", "--device", "cpu"]) == 2
    assert "--model-size" in capsys.readouterr().err


def test_cpu_linear_kernel_is_reported_and_restored_after_the_run(tmp_path, capsys):
    from nar_diffusers.models.linear import onednn_linear_active

    before = onednn_linear_active()
    report = _benchmark(tmp_path, "--grid", "2", "2", "--batch-sizes", "1", "--cpu-linear", "torch")
    assert report["environment"]["cpu_linear"] == "torch" and report["settings"]["cpu_linear"] == "torch"
    assert "torch linear layers" in capsys.readouterr().out
    assert onednn_linear_active() == before
    default = _benchmark(tmp_path, "--grid", "2", "2", "--batch-sizes", "1", "--orders", "nar")
    assert default["settings"]["cpu_linear"] == "auto"
    assert default["environment"]["cpu_linear"] == ("onednn" if before else "torch")
