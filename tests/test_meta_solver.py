"""MetaSolver files: plain data, loaded without running code, every error naming the file."""
from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

from metasolve import Choice, Integer, Interval, LogInterval, MetaSolver, Space, Vector
from metasolve.training.checkpoint import CheckpointError

SPACE = Space({
    "x0": Vector((6, 5), basis="sine", modes=3, scale=2.0, decay=1.5),
    "guess": Vector(7, basis="identity"),
    "pc_sor_omega": Interval(1.0, 1.99),
    "ksp_rtol": LogInterval(1e-8, 1e-2),
    "ksp_gmres_restart": Integer(5, 50),
    "solver": Choice([{"ksp_type": "cg", "pc_type": "jacobi"}, {"ksp_type": "gmres", "pc_type": "ilu"}]),
})


def trained(seed: int = 0) -> MetaSolver:
    torch.manual_seed(seed)
    meta = MetaSolver(4, SPACE, hidden=8, depth=1)
    with torch.no_grad():
        for parameter in meta.parameters():
            parameter.normal_()
        meta.feature_mean.normal_()
    return meta


def test_space_round_trips_through_plain_data():
    data = SPACE.to_dict()
    assert pickle.loads(pickle.dumps(data)) == data
    again = Space.from_dict(data)
    assert repr(again) == repr(SPACE) and again.dim == SPACE.dim
    theta = torch.randn(SPACE.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    decoded, expected = again.decode(theta), SPACE.decode(theta)
    for name in expected:
        assert str(decoded[name]) == str(expected[name])


def test_space_from_dict_names_what_is_wrong():
    with pytest.raises(ValueError, match="'w'.*unknown kind 'spline'"):
        Space.from_dict({"parts": [["w", {"kind": "spline"}]]})
    with pytest.raises(ValueError, match="'omega'.*malformed"):
        Space.from_dict({"parts": [["omega", {"kind": "interval", "lo": 1.0}]]})


def test_saved_meta_solver_loads_with_weights_only_and_predicts_the_same(tmp_path):
    meta = trained()
    path = tmp_path / "meta.pt"
    meta.save(path)
    torch.load(path, weights_only=True)  # plain data: no pickled objects in the file
    loaded = MetaSolver.load(path)
    features = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(loaded(features), meta(features), rtol=0, atol=0)
    assert loaded.spec == meta.spec


class _RunsCode:
    """What an attacker puts in a .pt file: unpickling it calls os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"meta_solver": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*refused.*{os.system.__module__}.system"):
        MetaSolver.load(path)
    assert not marker.exists()


def test_an_old_file_with_a_pickled_space_is_refused_naming_it(tmp_path):
    meta = trained()
    path = tmp_path / "old.pt"
    torch.save({"meta_solver": {"spec": meta.spec, "space": SPACE, "state": meta.state_dict()}}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*refused.*metasolve.method.params.Space"):
        MetaSolver.load(path)


@pytest.mark.parametrize("damage, what", [("truncated", "truncated"), ("random", "random or damaged"),
                                          ("empty", "empty"), ("not a model", "holds no meta-solver")])
def test_damaged_files_give_an_error_naming_the_file(tmp_path, damage, what):
    path = tmp_path / "meta.pt"
    trained().save(path)
    content = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif damage == "random":
        path.write_bytes(random.Random(0).randbytes(len(content)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*{what}"):
        MetaSolver.load(path)


def test_a_malformed_export_names_the_file_and_the_problem(tmp_path):
    meta = trained()
    exported = meta.export()
    exported["state"] = {"net.0.weight": torch.zeros(1)}
    path = tmp_path / "bad.pt"
    torch.save({"meta_solver": exported}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*malformed"):
        MetaSolver.load(path)
    with pytest.raises(CheckpointError, match="no such"):
        MetaSolver.load(tmp_path / "missing.pt")


ANCHORED_SPACE = Space({"x0": Vector(5, basis="identity"), "pc_sor_omega": Interval(1.0, 2.0),
                        "ksp_rtol": LogInterval(1e-8, 1e-2)})


def test_an_anchored_meta_solver_with_a_zero_network_deploys_the_formula():
    """θ = encode_clipped(feature) + network output; an untrained network's output is exactly zero,
    so decode gives the feature's value back to round-off (sigmoid∘logit), clipped at the bounds."""
    torch.manual_seed(0)
    meta = MetaSolver(4, ANCHORED_SPACE, hidden=8, depth=1, anchor={"pc_sor_omega": 2, "ksp_rtol": 0})
    features = torch.tensor([[1e-5, 3.0, 1.37, -2.0], [3e-7, 0.1, 1.9123456789, 5.0], [1e-9, 0.0, 2.3, 0.0]],
                            dtype=torch.float64)
    settings = [meta.space.decode(row) for row in meta(features).detach()]
    for setting, row in zip(settings[:2], features[:2]):
        assert setting["pc_sor_omega"] == pytest.approx(float(row[2]), rel=1e-14, abs=0)
        assert setting["ksp_rtol"] == pytest.approx(float(row[0]), rel=1e-12, abs=0)
        assert float(abs(torch.as_tensor(setting["x0"])).max()) == 0.0  # parts without an anchor stay at θ = 0
    from metasolve.method.params import ANCHOR_CLIP

    # 2.3 and 1e-9 lie outside their intervals: clipped to ANCHOR_CLIP of the interval inside the bounds.
    assert settings[2]["pc_sor_omega"] == pytest.approx(2.0 - ANCHOR_CLIP, rel=1e-14)
    assert settings[2]["ksp_rtol"] == pytest.approx(1e-8 * (1e-2 / 1e-8) ** ANCHOR_CLIP, rel=1e-12)
    with torch.no_grad():
        meta.net[-1].bias[ANCHORED_SPACE.slices["pc_sor_omega"]] = 0.5  # a learned correction moves it
    assert meta.space.decode(meta(features[:1])[0])["pc_sor_omega"] > 1.37 + 0.05


def test_the_anchor_round_trips_through_export_and_save(tmp_path):
    torch.manual_seed(1)
    meta = MetaSolver(4, ANCHORED_SPACE, hidden=8, depth=1, anchor={"pc_sor_omega": 3})
    with torch.no_grad():
        for parameter in meta.parameters():
            parameter.normal_()
    features = torch.tensor([[0.0, 1.0, 2.0, 1.8], [1.0, -1.0, 0.5, 1.2]], dtype=torch.float64)
    again = MetaSolver.from_export(meta.export())
    assert again.spec["anchor"] == {"pc_sor_omega": 3}
    torch.testing.assert_close(again(features), meta(features), rtol=0, atol=0)
    meta.save(tmp_path / "anchored.pt")
    loaded = MetaSolver.load(tmp_path / "anchored.pt")
    torch.testing.assert_close(loaded(features), meta(features), rtol=0, atol=0)
    exported = meta.export()
    del exported["spec"]["anchor"]  # a file written before anchors existed loads without one
    assert MetaSolver.from_export(exported).spec["anchor"] == {}


def test_a_bad_anchor_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="'pc_gamg_threshold'.*does not have"):
        MetaSolver(4, ANCHORED_SPACE, anchor={"pc_gamg_threshold": 0})
    with pytest.raises(ValueError, match="'x0'.*only a scalar Interval"):
        MetaSolver(4, ANCHORED_SPACE, anchor={"x0": 0})
    with pytest.raises(ValueError, match=r"integer in \[0, 4\), got 4"):
        MetaSolver(4, ANCHORED_SPACE, anchor={"pc_sor_omega": 4})
    meta = MetaSolver(4, ANCHORED_SPACE, anchor={"pc_sor_omega": 1})
    with pytest.raises(ValueError, match="anchor of 'pc_sor_omega' \\(feature 1\\) is not finite"):
        meta(torch.tensor([[0.0, float("nan"), 0.0, 0.0]], dtype=torch.float64))
