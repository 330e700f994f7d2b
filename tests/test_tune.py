"""``vitprune tune``: recipes round-trip, infeasible budgets say what is reachable, and on a small space the search
finds what exhaustive enumeration finds."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import vitprune
from vitprune.cli import app
from vitprune.specs import parse_method_spec
from vitprune.tune import Budget, CostModel, Judge, make_splits, read_recipe, tune, write_outputs

from conftest import make_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    return make_vit("vit_tiny_patch16_224", img_size=64, depth=6, num_classes=10)


def images(n: int = 48, labelled: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 64, 64, generator=g)
    return x, (torch.randint(0, 10, (n,), generator=g) if labelled else None)


def test_budget_is_one_clear_choice() -> None:
    with pytest.raises(ValueError, match="exactly one budget"):
        Budget()
    with pytest.raises(ValueError, match="exactly one budget"):
        Budget(macs=0.5, speedup=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Budget(macs=1.5)


def test_recipe_round_trip(tmp_path) -> None:
    model = tiny()
    data = images()
    result = tune(model, Budget(macs=0.7), data, data, data, methods=["tome", "evit"], out=tmp_path)
    paths = write_outputs(result, tmp_path)
    recipe = json.loads(paths["recipe"].read_text())
    assert recipe["macs_fraction"] <= 0.7 and recipe["holdout"]["n"] == 48 and recipe["method"] in ("tome", "evit")
    assert paths["plot"].stat().st_size > 0 and "spec" in paths["csv"].read_text().splitlines()[0]
    method, config = read_recipe(paths["recipe"])
    assert parse_method_spec(f"recipe:{paths['recipe']}") == (method, config)
    x = data[0][:4]
    with torch.no_grad():
        vitprune.patch(model, str(paths["recipe"]))
        from_recipe = model(x)
        vitprune.patch(model, method, **config)
        assert torch.equal(model(x), from_recipe)
    assert CostModel(vitprune.unpatch(model), x).fraction(method, config) == pytest.approx(recipe["macs_fraction"])
    with pytest.raises(ValueError, match="recipe fixes"):
        vitprune.patch(model, str(paths["recipe"]), r=3)
    (tmp_path / "bad.json").write_text('{"method": "tome"}')
    with pytest.raises(ValueError, match="not a vitprune recipe"):
        vitprune.patch(model, str(tmp_path / "bad.json"))
    assert not vitprune.is_patched(model)


def test_rerun_resumes_without_evaluating_again(tmp_path) -> None:
    data = images(24)
    first = tune(tiny(), Budget(macs=0.8), data, data, data, methods=["tome"], out=tmp_path)
    again = tune(tiny(), Budget(macs=0.8), data, data, data, methods=["tome"], out=tmp_path)
    assert again.recipe["search"]["new_evaluations"] == 0
    assert again.recipe["spec"] == first.recipe["spec"]


def test_infeasible_budget_names_the_smallest_reachable() -> None:
    data = images(8)
    with pytest.raises(ValueError, match=r"cannot be reached: the smallest reachable is 0\.\d+ of the MACs"):
        tune(tiny(), Budget(macs=0.05), data, data, data)


def test_cli_infeasible_budget_exits_2_with_one_line(tmp_path, testbed_assets) -> None:
    res = CliRunner().invoke(app, ["tune", "--model", "testbed", "--data", "testbed", "--macs", "0.05",
                                   "--calib-limit", "16", "--holdout-limit", "8", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "smallest reachable" in res.output and "Traceback" not in res.output


def test_splits_never_share_an_image() -> None:
    x = torch.arange(100.0).view(100, 1, 1, 1).expand(100, 3, 2, 2)
    data = [(x[i], i % 10) for i in range(100)]
    search, calib, held = make_splits(data, None, 30, 50, 10, labelled=True)
    ids = lambda s: set(s[0][:, 0, 0, 0].long().tolist())  # noqa: E731
    assert len(ids(calib)) == 30 and ids(search) <= ids(calib) and not ids(calib) & ids(held)


@pytest.mark.usefixtures("testbed_assets")
def test_search_finds_the_exhaustive_optimum_on_a_small_space() -> None:
    """ToMe with one r per third of the testbed's blocks, r ∈ 0..3: the tuner (shapes + greedy descent over three
    groups) scores at least as well as the best of all 64 schedules that meet the budget."""
    from vitprune.measure.data import load_dataset, strided_indices
    from vitprune.models import create_model

    model = create_model("testbed")
    test = load_dataset("testbed")
    idx = strided_indices(len(test), 128)
    x = torch.stack([test[i][0] for i in idx])
    y = torch.tensor([test[i][1] for i in idx])
    budget = 0.75
    result = tune(model, Budget(macs=budget), (x, y), (x, y), (x, y), methods=["tome"], greedy_groups=3)
    found = max(c.score for c in result.candidates if c.split == "search" and c.macs_fraction <= budget)

    judge, cost = Judge(model, x, y), CostModel(model, x)
    best = -math.inf
    for r3 in itertools.product(range(4), repeat=3):
        config = {"r": [r for r in r3 for _ in range(4)]}
        if cost.fraction("tome", config) > budget:
            continue
        vitprune.patch(model, "tome", **config)
        best = max(best, judge()[0])
        vitprune.unpatch(model)
    assert math.isfinite(best)  # some schedule meets the budget
    assert found >= best - 1e-9
