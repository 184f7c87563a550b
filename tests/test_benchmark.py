"""`nar-diffusers benchmark` smoke runs at toy sizes: the report's fields, never its timings."""

import json
import sys

import pytest
from conftest import make_pipeline

from nar_diffusers.commands.cli import main
from nar_diffusers.schedulers.scheduling_neighbor import NeighborScheduler

# Memory is measured in child processes; the tests below that are not about memory leave it off.
TINY = ["--model-size", "2/4/32", "--vocab-size", "32", "--num-classes", "4", "--device", "cpu", "--warmup", "0",
        "--repeats", "1", "--memory", "off"]  # fmt: skip


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
        assert row["peak_memory_mib"] is None and row["memory_kind"] == "off"
        assert row["dtype"] == "float32" and row["quantization"] == "none" and row["weights_mib"] > 0
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
                 "--batch-sizes", "1", "--memory", "off", "--json", str(path)]) == 0  # fmt: skip
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


def test_memory_is_measured_per_configuration_in_a_child_not_as_a_process_high_water_mark(tmp_path, capsys):
    # The big batch runs first: a process-wide high-water mark would report at least its peak for batch 1 too.
    report = _benchmark(tmp_path, "--memory", "on", "--model-size", "2/4/64", "--vocab-size", "4096", "--grid", "4",
                        "4", "--orders", "nar", "--decode", "eager", "static", "--batch-sizes", "64", "1")  # fmt: skip
    rows = {(r["decode"], r["batch_size"]): r for r in report["results"]}
    for row in rows.values():
        assert row["memory_kind"] == "child_peak_rss", row.get("memory_error")
        assert row["peak_memory_mib"] >= row["memory_before_mib"] > row["weights_mib"] > 0
        assert row["memory_added_mib"] == pytest.approx(row["peak_memory_mib"] - row["memory_before_mib"])
        parts = row["kv_cache_mib"] + row["code_pages_mib"] + row["activations_mib"]
        assert parts == pytest.approx(row["memory_added_mib"])
    for decode in ("eager", "static"):
        big, small = rows[(decode, 64)], rows[(decode, 1)]
        assert small["peak_memory_mib"] < big["peak_memory_mib"] and small["memory_added_mib"] < big["memory_added_mib"]
    # KV cache from the config: 2 (K, V) * 3 blocks (2 layers + a second head's block) * rows (guidance: 2 per
    # image) * 4 KV heads * (1 condition token + 15 fed tokens [+ 4 spare slots, static]) * head_dim 16 * 4 bytes.
    assert NeighborScheduler(grid_size=(4, 4)).num_fed_tokens == 15
    assert rows[("eager", 64)]["kv_cache_mib"] * 2**20 == 2 * 3 * 128 * 4 * 16 * 16 * 4
    assert rows[("static", 1)]["kv_cache_mib"] * 2**20 == 2 * 3 * 2 * 4 * 20 * 16 * 4
    out = capsys.readouterr().out
    assert "one generation adds MiB" in out and "peak RSS of a child process" in out


def test_dtypes_and_quantization_are_variants_with_their_own_rows(tmp_path):
    pytest.importorskip("torchao")
    report = _benchmark(tmp_path, "--grid", "3", "3", "--orders", "nar", "--batch-sizes", "1", "--dtype", "float32",
                        "bfloat16", "--quantization", "none", "int8wo")  # fmt: skip
    weights = {(r["dtype"], r["quantization"]): r["weights_mib"] for r in report["results"]}
    assert set(weights) == {(d, q) for d in ("float32", "bfloat16") for q in ("none", "int8wo")}
    assert weights[("bfloat16", "none")] == pytest.approx(weights[("float32", "none")] / 2)
    assert weights[("float32", "int8wo")] < weights[("float32", "none")]  # int8 storage, counted at its real size
    assert report["environment"]["dtype"] == "float32, bfloat16"


def test_quantization_without_torchao_is_an_error_naming_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    assert main(["benchmark", *TINY, "--grid", "2", "2", "--quantization", "none", "int8wo"]) == 2
    err = capsys.readouterr().err
    assert "--quantization int8wo" in err and "torchao" in err


def test_a_child_that_raises_or_dies_is_reported_not_raised():
    import os

    from nar_diffusers.utils.memory import run_in_child

    preload = ("nar_diffusers.commands.benchmark",)  # the benchmark's own helper process, already started
    raised = run_in_child(os.path.getsize, "/no/such/file", preload=preload)
    assert raised["error"].startswith("FileNotFoundError")
    assert run_in_child(os._exit, 3, preload=preload) == {"error": "the child process died (exit code 3; out of memory?)"}


def test_kv_cache_dtypes_are_variants_and_a_float8_cache_counts_its_scales(tmp_path, capsys):
    report = _benchmark(tmp_path, "--memory", "on", "--grid", "4", "4", "--orders", "nar", "--batch-sizes", "2",
                        "--kv-cache-dtype", "model", "bfloat16", "float8_e4m3fn")  # fmt: skip
    rows = {r["kv_cache_dtype"]: r for r in report["results"]}
    assert set(rows) == {"model", "bfloat16", "float8_e4m3fn"}
    # 2 (K, V) * 3 blocks * 4 rows (batch 2, guidance) * 4 KV heads * 16 slots (1 condition + 15 fed) * (head_dim 8
    # * bytes per element [+ one float32 scale per slot, float8]).
    slots = 2 * 3 * 4 * 4 * 16
    assert rows["model"]["kv_cache_mib"] * 2**20 == slots * 8 * 4
    assert rows["bfloat16"]["kv_cache_mib"] * 2**20 == slots * 8 * 2
    assert rows["float8_e4m3fn"]["kv_cache_mib"] * 2**20 == slots * (8 * 1 + 4)
    assert "| KV cache |" in capsys.readouterr().out


# A stand-in for the published code's interface (`autoregressive/models/{gpt,generate}.py`): its `generate` holds
# a known amount of memory, so the reference measurement has something exact to find.
_STAND_IN_GPT = '''
from dataclasses import dataclass
from typing import Optional
import torch

@dataclass
class ModelArgs:
    dim: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: Optional[int] = None
    multiple_of: int = 16
    ffn_dim_multiplier: Optional[float] = None
    vocab_size: int = 32
    num_classes: int = 4
    block_size: int = 16
    cls_token_num: int = 1
    model_type: str = "c2i"
    medusa_attention_num: int = 1

class Transformer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = torch.nn.Embedding(config.vocab_size, config.dim)
'''
_STAND_IN_GENERATE = '''
import json
import torch

def generate(model, cond, max_new_tokens, cfg_scale=1.0, cfg_interval=-1, **sampling):
    with open(CALLS, "w") as f:
        json.dump({"args": vars(model.config), "batch": len(cond), "tokens": max_new_tokens, "cfg": cfg_scale,
                   "sampling": sampling}, f)
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    return torch.zeros(len(cond), max_new_tokens, dtype=torch.long) + int(held[0])
'''


def test_reference_code_measures_the_published_sampler_like_ours_and_compares(tmp_path, capsys):
    models = tmp_path / "checkout" / "NAR-images" / "autoregressive" / "models"
    models.mkdir(parents=True)
    (models / "gpt.py").write_text(_STAND_IN_GPT)
    (models / "generate.py").write_text(f"CALLS = {str(tmp_path / 'calls.json')!r}\n" + _STAND_IN_GENERATE)
    report = _benchmark(tmp_path, "--memory", "on", "--grid", "4", "4", "--orders", "nar", "--batch-sizes", "2",
                        "--reference-code", str(tmp_path / "checkout"))  # fmt: skip
    (reference,) = report["reference"]
    assert reference["memory_kind"] == "child_peak_rss", reference.get("error")
    assert 64 <= reference["memory_added_mib"] < 80
    call = json.loads((tmp_path / "calls.json").read_text())
    assert call["batch"] == 2 and call["tokens"] == 16 and call["cfg"] == 2.0
    assert call["args"] == {"dim": 32, "n_layer": 2, "n_head": 4, "n_kv_head": None, "multiple_of": 16,
                            "ffn_dim_multiplier": None, "vocab_size": 32, "num_classes": 4, "block_size": 16,
                            "cls_token_num": 1, "model_type": "c2i", "medusa_attention_num": 1}  # fmt: skip
    assert call["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "sample_logits": True}
    (against,) = [c for c in report["comparisons"] if "memory_vs_reference" in c]
    ours = report["results"][0]["memory_added_mib"]
    assert against["memory_vs_reference"] == pytest.approx(ours / reference["memory_added_mib"])
    assert "ours / published" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference-code", "/nonexistent"], "no autoregressive/models/gpt.py"),
        (["--grid", "2", "3", "--reference-code", "CHECKOUT"], "square 2-D --grid"),
        (["--grid", "2", "2", "--orders", "raster", "--reference-code", "CHECKOUT"], "include nar in --orders"),
    ],
)
def test_reference_code_errors_name_the_flag(tmp_path, capsys, extra, message):
    models = tmp_path / "autoregressive" / "models"
    models.mkdir(parents=True)
    (models / "gpt.py").write_text(_STAND_IN_GPT)
    (models / "generate.py").write_text(_STAND_IN_GENERATE)
    extra = [str(tmp_path) if value == "CHECKOUT" else value for value in extra]
    assert main(["benchmark", *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert "--reference-code" in err and message in err
