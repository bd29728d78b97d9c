"""MetaSolver files: plain data, loaded without running code, every error naming the file."""
from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

from metasolve import Choice, Integer, Interval, LogInterval, MetaSolver, Space, Vector
from metasolve.checkpoint import CheckpointError

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
    with pytest.raises(CheckpointError, match=f"{path}.*refused.*metasolve.params.Space"):
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
