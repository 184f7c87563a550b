"""`nar-diffusers benchmark --suite gpu`: its dry run on a CPU (toy sizes), so the GPU command cannot rot."""

import importlib.util
import json

import torch

from nar_diffusers.commands import benchmark, gpu_suite
from nar_diffusers.commands.cli import main

DRY = ["benchmark", "--suite", "gpu", "--dry-run", "--device", "cpu", "--warmup", "0", "--repeats", "1",
       "--memory", "off"]  # fmt: skip


def _report(tmp_path) -> dict:
    return json.loads((tmp_path / "gpu_suite.json").read_text())


def test_dry_run_checks_decode_equality_backends_and_throughput_into_one_json_and_one_table(tmp_path):
    assert main([*DRY, "--output-dir", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert report["dry_run"] is True and report["environment"]["device"] == "cpu"
    equality = {(c["order"], c["sampling"], c["decode"]): c for c in report["checks"] if c["check"] == "decode_equality"}
    assert set(equality) == {(o, s, "static") for o in ("nar", "raster") for s in ("greedy", "seeded")} | {
        (o, "greedy", "compiled") for o in ("nar", "raster")
    }
    assert all(c["status"] == "ok" and c["agreement"] == 1.0 and c["dtype"] == "bfloat16" for c in equality.values())
    backends = {c["backend"]: c for c in report["checks"] if c["check"] == "attention_backend"}
    assert set(backends) == set(gpu_suite.BACKENDS) and backends["native"]["status"] == "ok"
    assert backends["xformers"]["status"] == ("unavailable" if importlib.util.find_spec("xformers") is None else "ok")
    quantized = ["none"] + (["int8wo"] if importlib.util.find_spec("torchao") else [])
    rows = {(r["order"], r["quantization"], r["kv_cache_dtype"], r["batch_size"]) for r in report["throughput"]}
    assert rows == {(o, q, k, b) for o in ("nar", "raster") for q in quantized for k in ("model", "float8_e4m3fn")
                    for b in (1, 2)}  # fmt: skip
    assert all(r["dtype"] == "bfloat16" and r["model_size"] == "2/4/32" for r in report["throughput"])
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| decode_equality | nar greedy compiled | ok |" in table and "| 2/4/32 | 4x4 | raster |" in table


def test_a_failing_check_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    def broken_backends(*args, **kwargs):
        raise RuntimeError("backend section broke")

    real = benchmark.run_benchmark

    def failing_quantized(args):
        if args.quantization != ["none"]:
            raise torch.cuda.OutOfMemoryError("no room for the quantized model")
        return real(args)

    monkeypatch.setattr(gpu_suite, "check_decode_equality", lambda *args, **kwargs: [])
    monkeypatch.setattr(gpu_suite, "check_attention_backends", broken_backends)
    monkeypatch.setattr(benchmark, "run_benchmark", failing_quantized)
    argv = [*DRY, "--output-dir", str(tmp_path), "--suite-grids", "3", "--suite-batch-sizes", "1",
            "--suite-quantization", "int8wo"]  # fmt: skip
    assert main(argv) == 1  # something failed, and said so
    checks = _report(tmp_path)["checks"]
    assert {"check": "attention_backend", "status": "error"}.items() <= checks[0].items()
    assert "backend section broke" in checks[0]["error"]
    throughput = {c["quantization"]: c for c in checks if c["check"] == "throughput"}
    if importlib.util.find_spec("torchao"):
        assert throughput["int8wo"]["status"] == "error" and "no room" in throughput["int8wo"]["error"]
    assert throughput["none"]["status"] == "ok" and len(_report(tmp_path)["throughput"]) == 4  # 2 orders x 2 caches
    failed = 2 if importlib.util.find_spec("torchao") else 1  # without torchao the quantized run is "skipped"
    assert f"3 checks, {failed} failed" in capsys.readouterr().out


def test_the_suite_without_a_gpu_or_its_flags_without_the_suite_are_clear_errors(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["benchmark", "--suite", "gpu", "--device", "cpu", "--output-dir", str(tmp_path)]) == 2
        assert "--suite gpu needs a CUDA device" in capsys.readouterr().err
    assert main(["benchmark", "--dry-run", "--device", "cpu"]) == 2
    assert "need --suite gpu" in capsys.readouterr().err
