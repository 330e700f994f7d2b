"""The benchmark harness that times the official ToMe and PPT code next to vitprune (`benchmarks/official_peers.py`).

The real repos are not on this machine (no hub, no vendoring); stand-in checkouts with the same layout (`tome/patch/
timm.py`; `ppt_deit.py` beside its own `tome.py`) check what the harness itself must get right: both peers load in one
process although both name a module ``tome``, the user's own ``tome`` (if any) is left alone, and a peer that
computes something else than vitprune's method is refused instead of timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_peers import load_peers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOME_TIMM = """
import vitprune
from tome import MARK

def apply_patch(model):
    assert MARK == "tome-repo"
    vitprune.patch(model, "tome", r={r})
"""
PPT_DEIT = """
import vitprune
from tome import MARK

def apply_patch(model, pp_loc_list, threshold):
    assert MARK == "ppt-repo" and pp_loc_list == [3, 6, 9]
    vitprune.patch(model, "ppt", r=50, threshold=threshold)
"""


def fake_checkouts(root: Path, tome_r: int = 13) -> tuple[Path, Path]:
    tome_dir, ppt_dir = root / "ToMe", root / "PPT"
    (tome_dir / "tome" / "patch").mkdir(parents=True)
    (tome_dir / "tome" / "__init__.py").write_text('MARK = "tome-repo"\n')
    (tome_dir / "tome" / "patch" / "__init__.py").write_text("")
    (tome_dir / "tome" / "patch" / "timm.py").write_text(TOME_TIMM.format(r=tome_r))
    ppt_dir.mkdir()
    (ppt_dir / "tome.py").write_text('MARK = "ppt-repo"\n')
    (ppt_dir / "ppt_deit.py").write_text(PPT_DEIT)
    return tome_dir, ppt_dir


def test_both_peers_load_in_one_process_and_match_vitprune(tmp_path):
    tome_dir, ppt_dir = fake_checkouts(tmp_path)
    model, x = make_vit(), torch.randn(1, 3, 224, 224)
    mine = sys.modules.get("tome")
    peers = load_peers([f"tome={tome_dir}", f"ppt={ppt_dir}"], model, x)
    assert [p.spec for p in peers] == ["tome:r=13", "ppt:r=50"]
    patched = peers[0].patch(model)
    assert patched is not model and patched.r == 13 and not hasattr(model, "r")  # a copy, the user's model untouched
    assert sys.modules.get("tome") is mine


def test_a_peer_doing_other_work_is_refused(tmp_path):
    tome_dir, _ = fake_checkouts(tmp_path, tome_r=12)
    with pytest.raises(SystemExit, match="differs from vitprune's tome:r=13"):
        load_peers([f"tome={tome_dir}"], make_vit(), torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("option, message", [("tome", "expected NAME=DIR"), ("dynamicvit=/x", "expected NAME=DIR"),
                                             ("tome=/nowhere", "cannot import tome.patch.timm")])
def test_bad_peer_options_say_what_to_pass(option, message):
    with pytest.raises(SystemExit, match=message):
        load_peers([option], make_vit(), torch.randn(1, 3, 224, 224))
