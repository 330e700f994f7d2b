"""Short real training runs on the testbed: selectors, label-free, full fine-tune under PPT, latency budget,
multi-stage, resume after a kill, and torchrun DDP with 2 gloo processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitprune
from vitprune.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("testbed_assets")

TINY = dict(limit=96, batch_size=8, warmup_steps=2, progress=False, log_every=1)


def _read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_selector_training_updates_selectors_and_loads(tmp_path):
    cfg = TrainConfig(method="heatvit", steps=4, save_every=2, out=str(tmp_path / "h"), **TINY)
    result = train(cfg)
    log = _read_log(tmp_path / "h")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(k in log[-1] for k in ("ce", "kl", "tokens", "keep@4", "keep@7", "keep@10"))
    # top-k training keeps exactly what fixed-count inference keeps: round(keep_i · 64) of the 64 patch tokens
    for layer, keep in zip((4, 7, 10), (0.7, 0.49, 0.343)):
        assert all(r[f"keep@{layer}"] == pytest.approx(round(keep * 64) / 64, abs=1e-6) for r in log)
    assert "ratio" not in log[-1]
    assert result.steps == 4
    torch.manual_seed(cfg.seed)  # the same draws as train(): model, then selectors
    fresh = vitprune.patch(vitprune.models.create_model("testbed"), "heatvit")
    trained = load_file(str(tmp_path / "h" / "selectors.safetensors"))
    moved = [not torch.equal(fresh.vitprune_method.state_dict()[k], v) for k, v in trained.items()]
    assert any(moved)
    model = vitprune.load("testbed", tmp_path / "h")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert not (tmp_path / "h" / "backbone.safetensors").exists()


def test_ratio_loss_pulls_keep_rates_to_target(tmp_path):
    from vitprune.train.losses import LossWeights

    cfg = TrainConfig(method="spvit", method_config={"keep": (0.9, 0.8, 0.7), "decisions": "gumbel"}, steps=25, lr=1e-2,
                      loss=LossWeights(ce=0.0, kl=0.0, tokens=0.0, ratio=10.0), label_free=True, save_every=100,
                      out=str(tmp_path / "r"), **TINY)
    train(cfg)
    log = _read_log(tmp_path / "r")
    # untrained, each stage keeps about half of what reaches it (≈ 0.5, 0.25, 0.125); the targets pull them up
    assert log[-1]["keep@9"] > log[0]["keep@9"] + 0.1
    assert log[-1]["ratio"] < log[0]["ratio"]
    assert "ce" not in log[-1]


def test_full_finetune_under_ppt_writes_backbone(tmp_path):
    cfg = TrainConfig(method="ppt", method_config={"r": 16, "threshold": 6e-5}, steps=2, freeze_backbone=False,
                      out=str(tmp_path / "p"), **TINY)
    train(cfg)
    assert (tmp_path / "p" / "backbone.safetensors").exists()
    model = vitprune.load("testbed", tmp_path / "p")
    assert model._vitprune.method.name == "ppt"
    with pytest.raises(ValueError, match="nothing to train"):
        train(replace(cfg, freeze_backbone=True, out=str(tmp_path / "p2")))


def test_latency_budget_trains_against_the_lut(tmp_path):
    from vitprune.methods.selector import MultiHeadSelector
    from vitprune.models import create_model
    from vitprune.train.lut import profile_lut

    lut = profile_lut(create_model("testbed", shared_weights=False), batch_size=2, threads=1, counts=[1, 33, 65],
                      rounds=1, selector=MultiHeadSelector(192, 3))
    lut.save(tmp_path / "lut.json")
    cfg = TrainConfig(method="heatvit", steps=3, lut=str(tmp_path / "lut.json"), target_speedup=1.5,
                      out=str(tmp_path / "l"), **TINY)
    train(cfg)
    last = _read_log(tmp_path / "l")[-1]
    assert "latency" in last and "ratio" not in last and last["predicted_ms"] > 0
    with pytest.raises(ValueError, match="LUT"):
        train(replace(cfg, lut=None))


def test_multistage_places_selectors_deepest_first(tmp_path):
    from vitprune.measure.data import load_dataset
    from vitprune.train.multistage import train_multistage

    cfg = TrainConfig(method="heatvit", method_config={"keep": (0.7, 0.5, 0.3)}, steps=6, out=str(tmp_path / "m"),
                      **TINY)
    train_multistage(cfg, load_dataset("testbed", limit=32), log=lambda _m: None)
    record = json.loads((tmp_path / "m" / "multistage.json").read_text())
    blocks = [s["chosen"]["block"] for s in record["stages"]]
    assert len(blocks) == 3 and blocks == sorted(blocks, reverse=True)
    assert all("fidelity" in c for s in record["stages"] for c in s["probed"] if len(s["probed"]) > 1)
    config = json.loads((tmp_path / "m" / "vitprune.json").read_text())
    assert sorted(config["config"]["blocks"]) == sorted(blocks)


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitprune", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    args = ["-m", "heatvit", "--limit", "96", "--batch-size", "8", "--steps", "8", "--save-every", "2",
            "--log-every", "1", "--val-data", ""]
    full = _cli(*args, "--out", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stdout.read().decode()[-2000:]

    killed = _cli(*args, "--out", str(tmp_path / "cut"))
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once it is past the step-4 checkpoint, mid-run
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(log.read_text().splitlines()) < 8, "the run finished before it could be killed"
    resumed = _cli(*args, "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()[-2000:]
    a = load_file(str(tmp_path / "full" / "selectors.safetensors"))
    b = load_file(str(tmp_path / "cut" / "selectors.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_torchrun_ddp_two_gloo_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "vitprune", "train", "-m", "heatvit", "--limit", "64", "--batch-size", "4", "--steps", "3",
           "--out", str(tmp_path / "d"), "--val-data", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert [r["step"] for r in _read_log(tmp_path / "d")] == [3]


def test_quantization_aware_training_trains_through_fake_quant(tmp_path):
    """QAT: the student runs int8 + polynomials while the fp32 weights train; the checkpoint is the plain layout."""
    from vitprune.models import create_model

    base = dict(method="tome", method_config={"r": 4}, steps=2, freeze_backbone=False, backbone_lr=1e-3, **TINY)
    train(TrainConfig(out=str(tmp_path / "fp32"), **base))
    train(TrainConfig(out=str(tmp_path / "qat"), quantize="int8+poly", **base))
    fp32, qat = _read_log(tmp_path / "fp32"), _read_log(tmp_path / "qat")
    assert qat[0]["ce"] != pytest.approx(fp32[0]["ce"], abs=1e-6)  # the first forward already ran quantized
    weights = load_file(str(tmp_path / "qat" / "backbone.safetensors"))
    plain = create_model("testbed").state_dict()
    assert set(weights) == set(plain)  # no fake-quant buffers: loads into a plain timm model
    assert any(not torch.equal(weights[k], plain[k]) for k in plain)  # gradients reached the fp32 weights
    assert json.loads((tmp_path / "qat" / "vitprune.json").read_text())["quantized"] == "int8+poly"
    with pytest.raises(ValueError, match="quantize must be one of"):
        train(TrainConfig(out=str(tmp_path / "bad"), quantize="int4", **base))
