"""The probes of a new user's mistakes (issue: one clear error for every mistake): each gives the documented
behaviour, and a patched model survives pickle, torch.save and deepcopy."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from typer.testing import CliRunner

import vitprune
from conftest import make_vit
from vitprune.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    return make_vit("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4)


def patched_keep(model, method, **cfg) -> dict[int, float]:
    vitprune.patch(model, method, **cfg)
    return dict(model._vitprune.method.keep_at)


# ---------------------------------------------------------------- per-block settings follow their blocks


@pytest.mark.parametrize("method", ["evit", "togo"])
def test_unsorted_blocks_keep_their_own_values(method: str) -> None:
    keep = patched_keep(tiny(), method, blocks=(3, 1), keep=(0.9, 0.5))
    assert keep == {1: 0.5, 3: 0.9}


def test_selector_pairs_unsorted_blocks_before_checking_monotonic_keep() -> None:
    model = tiny()
    vitprune.patch(model, "spvit", blocks=(3, 1), keep=(0.4, 0.8))  # block 1 keeps 0.8, block 3 keeps 0.4: valid
    assert model._vitprune.method.keep_at == {1: 0.8, 3: 0.4}


def test_ppt_r_follows_its_block() -> None:
    model = tiny()
    vitprune.patch(model, "ppt", blocks=(2, 1), r=(1, 3))
    assert model._vitprune.method._r_at == {1: 3, 2: 1}


def test_a_single_int_is_one_block() -> None:
    model = tiny()
    vitprune.patch(model, "evit", blocks=2, keep=0.5)
    assert model._vitprune.method.blocks == (2,)


@pytest.mark.parametrize(
    "method,cfg,error,match",
    [
        ("evit", {"blocks": (1.7, 2.2)}, TypeError, "whole block indices"),
        ("togo", {"blocks": (1.0, 2)}, TypeError, "whole block indices"),
        ("evit", {"blocks": ()}, ValueError, "blocks is empty"),
        ("ppt", {"blocks": []}, ValueError, "blocks is empty"),
        ("evit", {"blocks": "3"}, TypeError, "block indices"),
        ("tome", {"r": [1.7, 2.9]}, ValueError, "whole numbers"),
        ("tome", {"r": 2.5}, ValueError, "must be an int"),
        ("tome", {"r": (4, 1, 2)}, ValueError, r"\(r, inflection\)"),
        ("ppt", {"r": 2.5, "blocks": (1, 2)}, ValueError, "int"),
    ],
)
def test_bad_values_are_refused_not_truncated(method, cfg, error, match) -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        vitprune.patch(model, method, **cfg)
    assert type(model).__name__ == "VisionTransformer" and not vitprune.is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tome_tuple_is_r_and_inflection_list_is_per_block() -> None:
    model = tiny()
    vitprune.patch(model, "tome", r=(4, 1))  # the documented (r, inflection) form: a ramp from 0 to 8
    assert model._vitprune.method.schedule == [0, 2, 5, 8]
    vitprune.patch(model, "tome", r=[4, 1])  # a list: one value per block, the rest 0
    assert model._vitprune.method.schedule == [4, 1, 0, 0]


# ---------------------------------------------------------------- pickle, torch.save, deepcopy


@pytest.mark.parametrize("method,cfg", [("tome", {"r": 2}), ("evit", {"keep": 0.5, "blocks": (1,)}), ("ppt", {"r": 2, "blocks": (1, 2)}),
                                        ("togo", {"head_weights": "learned", "blocks": (1, 2)}),
                                        ("spvit", {"blocks": (1, 2), "keep": (0.7, 0.5)}),
                                        ("heatvit", {"blocks": (1, 2), "keep": (0.7, 0.5), "mode": "adaptive"})])
def test_patched_model_pickles_saves_and_copies(method, cfg) -> None:
    model = vitprune.patch(tiny(), method, **cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(clone) is type(model) and vitprune.is_patched(clone)
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        vitprune.unpatch(clone)
        assert type(clone).__name__ == "VisionTransformer"


def test_hf_patched_model_pickles() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3)
    model = vitprune.patch(transformers.ViTForImageClassification(cfg).eval(), "tome", r=2)
    x = torch.randn(1, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- corrupt files


def test_corrupt_checkpoints_name_the_file(tmp_path) -> None:
    from vitprune.models import create_model

    bad_st = tmp_path / "weights.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    bad_pth = tmp_path / "weights.pth"
    bad_pth.write_bytes(bytes(range(256)) * 8)
    for path in (bad_st, bad_pth):
        with pytest.raises(ValueError, match=f"{path.name}.*(truncated|corrupt)"):
            create_model("deit_tiny_patch16_224", checkpoint=path)


def test_corrupt_selectors_file_names_the_file(tmp_path) -> None:
    from vitprune.train.checkpoint import load_method_weights, save_trained

    model = vitprune.patch(tiny(), "spvit", blocks=(1, 2), keep=(0.7, 0.5))
    save_trained(model, tmp_path, model_name="deit_tiny_patch16_224", backbone=False)
    (tmp_path / "selectors.safetensors").write_bytes(b"\x00" * 10)  # a cut-off copy
    with pytest.raises(ValueError, match="selectors.safetensors.*truncated, corrupt"):
        load_method_weights(model.vitprune_method, tmp_path)


# ---------------------------------------------------------------- the CLI: a short message and exit code 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--model", "resnet18", "--no-speed"], "unsupported model type"),
        (["bench", "--batch-size", "0"], "--batch-size"),
        (["bench", "--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], "--device"),
        (["bench", "--model", "deit_tiny_patch16_224", "-m", "tome:r=1.5", "--no-speed"], "ToMe r must be"),
        (["bench", "--model", "deit_tiny_patch16_224", "--checkpoint", "missing.safetensors"], "not found"),
        (["export", "-o", "m.onnx", "--model", "resnet18"], "unsupported model type"),
        (["viz", "-i", "nothing.jpg"], "does not exist"),
    ],
)
def test_cli_user_errors_are_one_short_message(args, message, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 8


def test_cli_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--debug", "bench", "--model", "resnet18", "--no-speed"])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


def test_importing_the_cli_prints_nothing() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import vitprune.cli, vitprune.measure.speed"], capture_output=True,
                         text=True, check=True)
    assert out.stdout == "" and out.stderr == ""


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    from rich.console import Console

    from vitprune.progress import LineProgress, progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    bar = progress(console)
    assert isinstance(bar, LineProgress)
    with bar:
        task = bar.add_task("bench", total=3)
        bar.update(task, advance=1, description="tome r=2: accuracy")
        bar.update(task, advance=1, description="evit: accuracy")
    lines = buf.getvalue().splitlines()
    assert lines[1].endswith("tome r=2: accuracy 1/3") and len(lines) == 3
