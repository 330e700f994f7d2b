"""OpenVINO and ExecuTorch: every fixed-count method exports and matches PyTorch, int8 runs and stays close, the CLI
writes the files, bench composes runtimes with methods and reports latency and peak memory, bad input is one line."""
from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from typer.testing import CliRunner

import vitprune
from vitprune.cli import app

from conftest import make_vit

TOL = 1e-4  # fp32: the runtimes and PyTorch differ only in summation order (observed < 1e-6)

pytestmark = pytest.mark.usefixtures("one_thread")


def need(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install 'vitprune[openvino,executorch]')")


def tiny_vit():
    """3 blocks, 4x4 patch grid + CLS: exports in seconds; blocks 1 and 2 reduce."""
    return make_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2)


def ppt_mixed(model, x):
    from test_onnx import ppt_mixed as configure  # PPT pooling some images and pruning others in one batch

    configure(model, x)


CONFIGS = {
    "tome": lambda m, x: vitprune.patch(m, "tome", r=2),
    "evit": lambda m, x: vitprune.patch(m, "evit", keep=0.5, blocks=(1, 2)),
    "ppt": ppt_mixed,
    "togo": lambda m, x: vitprune.patch(m, "togo", keep=0.5, blocks=(1,)),
    "spvit": lambda m, x: vitprune.patch(m, "spvit", keep=(0.5,), blocks=(1,), mode="fixed"),
}
# the drift check (.ci/drift) runs one method per runtime against the newest releases
METHODS = [pytest.param(name, marks=pytest.mark.smoke) if name == "evit" else name for name in CONFIGS]


@pytest.fixture(scope="module")
def configured():
    """Each configuration's model and sample once per module."""

    @functools.cache
    def get(name: str):
        torch.manual_seed(0)
        model, x = tiny_vit(), torch.randn(4, 3, 32, 32)
        CONFIGS[name](model, x)
        return model, x

    return get


@pytest.fixture(scope="module")
def exported_file(configured, tmp_path_factory):
    """Each configuration's fp32 file, exported once per module: ``.xml`` OpenVINO IR or ``.pte`` ExecuTorch program
    (batches up to 8)."""

    @functools.cache
    def get(name: str, suffix: str):
        model, x = configured(name)
        path = tmp_path_factory.mktemp(name) / f"m{suffix}"
        if suffix == ".xml":
            from vitprune.hw.openvino_export import export_openvino

            return export_openvino(model, path, sample=x)
        from vitprune.hw.executorch_export import export_executorch

        return export_executorch(model, path, sample=x, max_batch=8)

    return get


def calibration():
    torch.manual_seed(1)
    return list(torch.randn(32, 3, 32, 32).split(8))


def assert_close_int8(model, runner, x: torch.Tensor) -> None:
    """Loose: int8 weights and activations leave ~1% error per matmul, and a method may then choose another token;
    on the testbed int8 moves top-1 by well under a point (see docs/hardware.md)."""
    with torch.no_grad():
        ref = model(x)
    out = runner(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out, ref, dim=1).min() > 0.98  # observed >= 0.998
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75  # observed 0.95-1.0 on random init


# ---- OpenVINO ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_openvino_matches_pytorch(configured, exported_file, name):
    need("openvino", "onnx", "onnxscript")
    from vitprune.hw.openvino_export import OpenVINOModule, ov_compiled
    from vitprune.hw.onnx_export import max_abs_diff

    model, x = configured(name)
    path = exported_file(name, ".xml")
    assert path.exists() and path.with_suffix(".bin").exists()
    runner = OpenVINOModule(ov_compiled(path, threads=1))
    assert max_abs_diff(model, runner, x) < TOL
    assert max_abs_diff(model, runner, torch.randn(7, 3, 32, 32)) < TOL  # the batch axis is dynamic


def test_openvino_int8(configured, exported_file, tmp_path):
    need("openvino", "nncf", "onnx", "onnxscript")
    from vitprune.hw.openvino_export import OpenVINOModule, ov_compiled, quantize_int8

    model, _ = configured("tome")
    fp32 = exported_file("tome", ".xml")
    int8 = quantize_int8(fp32, tmp_path / "m.int8.xml", calibration())
    assert int8.with_suffix(".bin").stat().st_size < 0.6 * fp32.with_suffix(".bin").stat().st_size
    assert "FakeQuantize" in int8.read_text()  # NNCF's quantize/dequantize pairs around the matmuls
    assert_close_int8(model, OpenVINOModule(ov_compiled(int8, threads=1)), torch.randn(16, 3, 32, 32))
    with pytest.raises(ValueError, match="onto itself"):
        quantize_int8(fp32, fp32, calibration())
    with pytest.raises(ValueError, match="calibration images"):
        quantize_int8(fp32, tmp_path / "q.xml", [])


# ---- ExecuTorch -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_executorch_matches_pytorch(configured, exported_file, name):
    need("executorch")
    from vitprune.hw.executorch_export import ExecuTorchModule
    from vitprune.hw.onnx_export import max_abs_diff

    model, x = configured(name)
    runner = ExecuTorchModule(exported_file(name, ".pte"), threads=1)
    assert runner.max_batch == 8
    assert max_abs_diff(model, runner, x) < TOL
    assert max_abs_diff(model, runner, torch.randn(11, 3, 32, 32)) < TOL  # 3 images, and 8 + 3: chunks of <= 8


def test_executorch_int8(configured, tmp_path):
    need("executorch")
    from vitprune.hw.executorch_export import ExecuTorchModule, export_executorch

    model, x = configured("tome")
    path = export_executorch(model, tmp_path / "m.int8.pte", sample=x, max_batch=16, calibration=calibration())
    assert_close_int8(model, ExecuTorchModule(path, threads=1), torch.randn(16, 3, 32, 32))


def test_executorch_rewrites_are_exact():
    """The ops the runtime lacks or gets wrong, rewritten before lowering, give PyTorch's numbers."""
    need("executorch")
    from vitprune.hw.executorch_export import REWRITES, _fold_alpha

    class Ops(torch.nn.Module):
        def forward(self, s: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
            order = s.argsort(dim=1, descending=True)
            values = s.sort(dim=1).values
            summed = torch.zeros(4, 3).scatter_reduce(0, idx.view(-1, 1).expand(-1, 3), src, reduce="sum")
            return order, values, summed, torch.add(2, idx, alpha=2), torch.sub(idx, 1, alpha=3)

    args = (torch.randn(2, 9), torch.tensor([1, 3, 1, 2, 1]), torch.randn(5, 3))
    program = _fold_alpha(torch.export.export(Ops(), args)).run_decompositions(REWRITES)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(op in t for t in targets for op in ("sort", "scatter_reduce"))
    assert all(n.kwargs.get("alpha", 1) == 1 for n in program.graph.nodes if n.op == "call_function")
    for a, b in zip(program.module()(*args), Ops()(*args)):
        assert torch.equal(a, b)


def test_executorch_threads(configured, exported_file):
    """The runner sizes the process's threadpool; once programs ran, another size is refused (resizing is unsafe)."""
    need("executorch")
    from executorch.extension.pybindings import portable_lib

    from vitprune.hw.executorch_export import ExecuTorchModule, set_threads

    _, x = configured("evit")
    path = exported_file("evit", ".pte")
    ExecuTorchModule(path, threads=1)(x[:2])
    assert portable_lib._threadpool_get_thread_count() == 1
    with pytest.raises(ValueError, match="one per process"):
        ExecuTorchModule(path, threads=2)
    with pytest.raises(ValueError, match=">= 1"):
        set_threads(0)


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_adaptive_method_is_refused(tmp_path):
    need("openvino", "executorch", "onnx", "onnxscript")
    from vitprune.hw.executorch_export import export_executorch
    from vitprune.hw.openvino_export import export_openvino

    model = vitprune.patch(tiny_vit(), "heatvit", keep=(0.5,), blocks=(1,), mode="adaptive")
    for export, path in ((export_openvino, tmp_path / "m.xml"), (export_executorch, tmp_path / "m.pte")):
        with pytest.raises(ValueError, match=r"data-dependent number of tokens.*fixed-count"):
            export(model, path)
        assert not path.exists()
    with pytest.raises(ValueError, match="ends in .xml"):
        export_openvino(tiny_vit(), tmp_path / "m.onnx")


@pytest.fixture
def tiny_cli(monkeypatch):
    import vitprune.models

    monkeypatch.setattr(vitprune.models, "create_model", lambda name, **kw: tiny_vit())
    return CliRunner()


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_export_bad_input(tiny_cli, tmp_path):
    one_line_error(tiny_cli.invoke(app, ["export", "--model", "tiny", "--format", "tflite", "--out",
                                         str(tmp_path / "m.tflite")]), "unknown --format 'tflite'", "openvino")
    one_line_error(tiny_cli.invoke(app, ["export", "--model", "tiny", "--format", "executorch", "--out",
                                         str(tmp_path / "m.onnx")]), "writes a .pte file")
    need("openvino", "onnx", "onnxscript")
    adaptive = tiny_cli.invoke(app, ["export", "--model", "tiny", "--format", "openvino", "-m",
                                     "heatvit:keep=(0.5,),blocks=(1,),mode=adaptive", "--out", str(tmp_path / "m.xml")])
    one_line_error(adaptive, "data-dependent number of tokens")
    assert not (tmp_path / "m.xml").exists()


def test_cli_export_openvino_and_executorch(tiny_cli, tmp_path):
    need("openvino", "nncf", "onnx", "onnxscript", "executorch")
    ov = tiny_cli.invoke(app, ["export", "--model", "tiny", "-m", "tome:r=2", "--format", "openvino", "--int8",
                               "--threads", "1", "--out", str(tmp_path / "tome.xml")])
    assert ov.exit_code == 0, ov.output
    diffs = [float(d) for d in re.findall(r"max \|diff\| (\S+)", ov.output)]
    assert len(diffs) == 2 and diffs[0] < TOL and diffs[1] < 0.5 and "PyTorch vs OpenVINO" in ov.output
    assert all((tmp_path / f).exists() for f in ("tome.xml", "tome.bin", "tome.int8.xml", "tome.int8.bin"))
    et = tiny_cli.invoke(app, ["export", "--model", "tiny", "--format", "executorch", "--threads", "1", "--out",
                               str(tmp_path / "none.pte")])
    assert et.exit_code == 0, et.output
    diffs = [float(d) for d in re.findall(r"max \|diff\| (\S+)", et.output)]
    assert len(diffs) == 1 and diffs[0] < TOL and (tmp_path / "none.pte").exists()


# ---- bench ------------------------------------------------------------------------------------------------------
def test_bench_runtime_rows_with_methods():
    """bench --runtime openvino: per configuration PyTorch, OpenVINO fp32 and int8 rows, each with its own top-1, all
    timed in one round-robin."""
    need("openvino", "nncf", "onnx", "onnxscript")
    from vitprune.bench import BenchSettings, run_bench

    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(8, 3, 32, 32)
    data = [(x, torch.arange(8) % 10)]
    settings = BenchSettings(batch_size=4, threads=1, rounds=1, runtime="openvino")
    result = run_bench(model, "tiny", ["evit:keep=0.5,blocks=(1,)"], data, settings, x, calibration=calibration())
    rows = result.rows
    assert [r.extra["runtime"] for r in rows] == ["pytorch", "openvino fp32", "openvino int8"] * 2
    assert [r.method for r in rows] == ["none"] * 3 + ["evit"] * 3
    assert all(r.img_per_s and r.img_per_s > 0 and r.extra["peak_mib"] > 0 for r in rows)
    for group in (rows[:3], rows[3:]):
        assert group[1].top1 == group[0].top1  # fp32 OpenVINO predicts what PyTorch predicts
        assert group[2].top1 is not None
    assert rows[4].config.endswith("OpenVINO fp32") and rows[0].speedup == 1.0
    assert "OpenVINO" in result.meta["runtime"] and "NNCF" in result.meta["runtime"]
    assert result.meta["runtimes"] == ["torch", "openvino-fp32", "openvino-int8"]
    assert not vitprune.is_patched(model)


def test_bench_executorch_rows():
    """bench --runtime executorch-fp32 at batch 1: the program is planned for the timed batch, the accuracy
    evaluation runs through it in chunks, and the row has latency percentiles."""
    need("executorch")
    from vitprune.bench import BenchSettings, run_bench

    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(6, 3, 32, 32)
    settings = BenchSettings(batch_size=1, threads=1, rounds=1, runtime="executorch-fp32")
    result = run_bench(model, "tiny", [], [(x, torch.arange(6) % 10)], settings, x)
    torch_row, et_row = result.rows
    assert et_row.extra["runtime"] == "executorch fp32" and et_row.top1 == torch_row.top1
    assert 0 < et_row.extra["latency_p50_ms"] <= et_row.extra["latency_p90_ms"] and result.meta["latency"]


def test_bench_compile_failure_is_one_clear_error(monkeypatch):
    from vitprune.bench import BenchSettings, run_bench

    def broken(model, **kwargs):
        def run(x):
            raise RuntimeError("inductor: no C++ compiler\nlong trace …")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    settings = BenchSettings(batch_size=2, threads=1, rounds=1, runtime="compile")
    with pytest.raises(ValueError, match=r"torch.compile failed .*RuntimeError: inductor: no C\+\+ compiler\);"):
        run_bench(tiny_vit(), "tiny", ["tome:r=2"], None, settings, torch.randn(2, 3, 32, 32))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="weight pre-packing needs a oneDNN build of torch")
def test_bench_compile_runtime_freezes_the_weights_and_reports_graph_breaks(monkeypatch):
    """``--runtime compile`` times the fastest compiled path: Inductor's freezing pre-packs every linear weight (its
    counter says so), for the accuracy pass's other batch shapes too, and freezing is off again afterwards. A
    configuration whose graph breaks is named (its row times a partly compiled model), the others are not."""
    from torch._dynamo.utils import counters

    from vitprune.bench import BenchSettings, run_bench
    from vitprune.methods.evit import EViT

    reduce = EViT.reduce

    def breaking_reduce(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return reduce(self, *args, **kwargs)

    monkeypatch.setattr(EViT, "reduce", breaking_reduce)
    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(5, 3, 32, 32)
    counters.clear()
    settings = BenchSettings(batch_size=2, threads=1, rounds=1, runtime="compile", eval_batch_size=2)
    result = run_bench(model, "tiny", ["tome:r=2", "evit:keep=0.5,blocks=(1,)"], [(x, torch.arange(5) % 10)], settings, x[:2])
    rows = {(r.extra["spec"], r.extra["runtime"]): r for r in result.rows}
    assert rows["tome:r=2", "torch.compile"].top1 == rows["tome:r=2", "pytorch"].top1
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] >= 3 * 4  # qkv, proj, fc1, fc2 per block
    assert torch._inductor.config.freezing is False
    assert "graph_breaks" not in rows["tome:r=2", "torch.compile"].extra
    assert rows["evit:keep=0.5,blocks=(1,)", "torch.compile"].extra["graph_breaks"]["count"] >= 1
    assert [line.split(" (")[0] for line in result.meta["graph_breaks"]] == ["evit:keep=0.5,blocks=(1,)"]


def test_cli_bench_batch1_latency_and_memory(tiny_cli, tmp_path):
    out = tmp_path / "bench"
    result = tiny_cli.invoke(app, ["bench", "--model", "tiny", "--batch-size", "1", "--rounds", "2", "--threads", "1",
                                   "-m", "tome:r=2", "--no-accuracy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    header = " ".join(result.output.split())
    assert "p50 ms" in header and "p90 ms" in header and "peak MiB" in header and "img/s" not in header
    rows = json.loads((out / "bench.json").read_text())["rows"]
    for row in rows:
        extra = row["extra"]
        assert 0 < extra["latency_p50_ms"] <= extra["latency_p90_ms"] and extra["peak_mib"] > 10
    batch8 = tiny_cli.invoke(app, ["bench", "--model", "tiny", "--batch-size", "8", "--rounds", "1", "--threads", "1",
                                   "-m", "tome:r=2", "--no-accuracy", "--out", str(tmp_path / "b8")])
    assert batch8.exit_code == 0 and "img/s" in batch8.output and "p90 ms" not in batch8.output


def test_cli_bench_bad_runtime(tiny_cli):
    one_line_error(tiny_cli.invoke(app, ["bench", "--model", "tiny", "--runtime", "tensorrt", "--no-speed"]),
                   "unknown runtime 'tensorrt'", "openvino[-fp32|-int8]")
    one_line_error(tiny_cli.invoke(app, ["bench", "--model", "tiny", "--runtime", "openvino", "--device", "cpu",
                                         "--dtype", "bf16", "--no-speed"]), "fp32 export")
    adaptive = tiny_cli.invoke(app, ["bench", "--model", "tiny", "--runtime", "openvino", "--no-speed",
                                     "-m", "heatvit:keep=(0.5,),blocks=(1,),mode=adaptive"])
    assert adaptive.exit_code == 2 and "data-dependent number of tokens" in adaptive.output
    assert "Traceback" not in adaptive.output


def test_parse_runtimes():
    from vitprune.hw.runtimes import parse_runtimes

    names = [t.name for t in parse_runtimes(["compile,openvino", "executorch-int8", "pytorch"])]
    assert names == ["torch", "compile", "openvino-fp32", "openvino-int8", "executorch-int8"]
    assert [t.label for t in parse_runtimes("onnxruntime-fp32")] == ["PyTorch", "ORT fp32"]
    for bad in ("compile-int8", "openvino-fp16", "trt"):
        with pytest.raises(ValueError, match="unknown runtime"):
            parse_runtimes(bad)
