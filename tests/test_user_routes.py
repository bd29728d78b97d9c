"""The config routes for a user's own tasks: a Python family named "module:Class", runs of a
program (arguments drawn or read from a table), and systems recorded from a program with PETSc's
own viewers — each trained through `metasolve.app.run.run` (real PETSc, real compiled programs)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from metasolve.app.config import ConfigError, parse_config
from metasolve.app.record import MAT_FILE_CLASSID, VEC_FILE_CLASSID, record, split_binary
from problems import EVAL_OFFSET, make_family
from problems.recorded import load_system
from solvers._petsc import PETSc
from solvers.executable import write_petsc_binary
from solvers.program_task import ArgumentFeatures, YoungOmega

REPO = Path(__file__).resolve().parents[1]
LEGACY_DIR = REPO / "examples" / "legacy_solver"

USER_FAMILY = '''
import numpy as np
import scipy.sparse as sp
import torch

from problems.family import Family, Task


class ShiftedLaplacian(Family):
    """1-D Laplacian plus a random diagonal shift: the user's own family, nothing registered."""

    key = "shifted"

    def __init__(self, seed=0, n=24):
        super().__init__(seed, n=n)
        self.n = n

    @property
    def feature_dim(self):
        return 1

    @property
    def feature_names(self):
        return ("shift",)

    def describe(self):
        return f"1-D Laplacian of {self.n} unknowns plus a shift ~ U[0, 1] (the user's family)"

    def _build(self, rng, index):
        shift = float(rng.uniform(0.0, 1.0))
        A = sp.diags([-np.ones(self.n - 1), (2.0 + shift) * np.ones(self.n), -np.ones(self.n - 1)], [-1, 0, 1])
        return Task(A.tocsr(), np.ones(self.n), features=torch.tensor([shift], dtype=torch.float64),
                    name=self.task_name(index))
'''

SHORT_TRAINING = """
[space.pc_sor_omega]
kind = "interval"
lo = 1.0
hi = 1.95

[cost]
kind = "iteration_proxy"
rtol = 1e-6
max_it = 2000

[pretrain]
enabled = false

[evaluate]
constant_evaluations = 0

[model]
hidden = 4
depth = 1

[train]
steps = 2
batch_size = 2
lr = 1e-2
"""


def test_user_family_by_module_path_trains_through_run(tmp_path, monkeypatch):
    from metasolve.app.run import run

    (tmp_path / "my_problems.py").write_text(USER_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config(textwrap.dedent("""
        [problem]
        family = "my_problems:ShiftedLaplacian"
        params = { n = 24 }
        features = "family"
        train_tasks = 4
        eval_tasks = 2

        [solver]
        ksp_type = "richardson"
        pc_type = "sor"
        """) + SHORT_TRAINING, "user.toml")
    result = run(config, tmp_path / "run", quiet=True)
    learned = result.evaluation["learned"]
    assert learned["tasks"] == [f"shifted-s0-i{EVAL_OFFSET + j}" for j in range(2)]
    assert all(np.isfinite(learned["iterations"])) and not any(learned["failed"])
    assert result.files["model"].is_file()


@pytest.mark.parametrize("name, message", [
    ("mydiffusion", "unknown problem family 'mydiffusion'"),
    ("no_such_module_xyz:Family", "cannot import module 'no_such_module_xyz'"),
    ("problems.family:check_count", "must be a concrete subclass of problems.family.Family"),
    ("problems.family:NoSuchClass", "has no 'NoSuchClass'"),
])
def test_unknown_family_is_a_clear_error(name, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_family(name, seed=0)


def test_unknown_family_in_a_config_is_a_config_error(tmp_path):
    from metasolve.app.run import run

    config = parse_config('[problem]\nfamily = "mydiffusion"\n[space.pc_sor_omega]\nkind = "interval"\n'
                          'lo = 1.0\nhi = 1.9\n', "bad.toml")
    with pytest.raises(ConfigError, match="unknown problem family 'mydiffusion'"):
        run(config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


ARGUMENTS = {"da_grid_x": {"integers": [17, 33]}, "da_grid_y": {"same_as": "da_grid_x"},
             "rho": {"log_uniform": [0.01, 100.0]}, "bc_type": "dirichlet"}


def test_program_family_draws_arguments_from_seed_and_index():
    family = make_family("program", seed=3, arguments=ARGUMENTS,
                         features={"young_omega": {"grid": ["da_grid_x", "da_grid_y"], "offset": -1}})
    again = make_family("program", seed=3, arguments=ARGUMENTS,
                        features={"young_omega": {"grid": ["da_grid_x", "da_grid_y"], "offset": -1}})
    other = make_family("program", seed=4, arguments=ARGUMENTS)
    first = [family.task(i) for i in (5, 0, EVAL_OFFSET)]
    assert [t.arguments for t in first] == [again.task(i).arguments for i in (5, 0, EVAL_OFFSET)]
    assert first[1].arguments == family.task(0).arguments  # order of building does not matter
    assert [t.arguments for t in family.train_tasks(8)] != [t.arguments for t in other.train_tasks(8)]
    for task in family.train_tasks(16):
        a = task.arguments
        assert 17 <= a["da_grid_x"] <= 33 and a["da_grid_y"] == a["da_grid_x"] and 0.01 <= a["rho"] <= 100.0
        assert a["bc_type"] == "dirichlet" and task.argv()[-2:] == ["-bc_type", "dirichlet"]
    # default features: the drawn numbers (logs of the log-uniform one), then Young's omega*
    assert family.feature_names == ("da_grid_x", "log(rho)", "young_omega")  # a same_as copy is no feature
    task = family.task(0)
    h = 1.0 / (task.arguments["da_grid_x"] - 1)
    assert float(task.features[-1]) == pytest.approx(2.0 / (1.0 + np.sin(np.pi * h)), rel=1e-12)
    assert float(task.features[1]) == pytest.approx(np.log(task.arguments["rho"]), rel=1e-12)


def test_young_omega_on_a_rectangular_grid_is_the_jacobi_radius_formula():
    """ρ_J of the 5-point operator scaled like a DMDA's (hy/hx, hx/hy couplings), computed directly."""
    young = YoungOmega(("mx", "my"), offset=-1)
    mx, my = 9, 5
    hx, hy = 1 / (mx - 1), 1 / (my - 1)
    nx, ny = mx - 2, my - 2
    T = lambda n: sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1])  # noqa: E731
    off = sp.kron(sp.eye(ny), T(nx)) * (hy / hx) + sp.kron(T(ny), sp.eye(nx)) * (hx / hy)
    rho = np.abs(np.linalg.eigvals((off / (2 * (hy / hx + hx / hy))).toarray())).max()
    assert young({"mx": mx, "my": my}) == pytest.approx(2 / (1 + np.sqrt(1 - rho ** 2)), rel=1e-12)
    features = ArgumentFeatures(("mx",), log=("mx",), derived=(young,))
    assert ArgumentFeatures.from_dict(json.loads(json.dumps(features.to_dict()))) == features
    with pytest.raises(ValueError, match="lack -my"):
        young({"mx": 9})


def test_program_family_reads_a_table(tmp_path):
    csv_table = tmp_path / "runs.csv"
    csv_table.write_text("da_grid_x,rho\n" + "\n".join(f"{17 + i},{0.5 * (i + 1)}" for i in range(6)) + "\n")
    family = make_family("program", seed=0, table=str(csv_table), arguments={"nu": 0.1})
    assert [t.arguments for t in family.train_tasks(3)] == [
        {"nu": 0.1, "da_grid_x": 17 + i, "rho": 0.5 * (i + 1)} for i in range(3)]
    assert [t.arguments["da_grid_x"] for t in family.eval_tasks(2)] == [22, 21]  # the last rows
    with pytest.raises(ValueError, match="overlap"):
        family.train_tasks(5)
    toml_table = tmp_path / "runs.toml"
    toml_table.write_text('[[run]]\nn = 8\nmode = "a"\n[[run]]\nn = 9\nmode = "b"\n')
    with pytest.raises(ValueError, match="eval_table .* gives arguments"):
        make_family("program", seed=0, table=str(toml_table), eval_table=str(csv_table))
    eval_table = tmp_path / "eval.csv"
    eval_table.write_text("mode,n\nc,30\n")
    toml_family = make_family("program", seed=0, table=str(toml_table), eval_table=str(eval_table))
    assert [t.arguments for t in toml_family.train_tasks(2)] == [{"n": 8, "mode": "a"}, {"n": 9, "mode": "b"}]
    assert toml_family.eval_tasks(1)[0].arguments == {"mode": "c", "n": 30}
    assert toml_family.feature_names == ("n",)
    with pytest.raises(ValueError, match="asks for row 2 of a table with 2 rows"):
        toml_family.train_tasks(3)
    with pytest.raises(ValueError, match="must be one of"):
        make_family("program", seed=0, arguments={"rho": {"lognormal": [0, 1]}})


def test_split_binary_cuts_appended_petsc_objects(tmp_path):
    """Objects appended by PETSc viewers come back one by one, byte for byte loadable."""
    path = tmp_path / "A.bin"
    matrices = [sp.random(5 + k, 5 + k, density=0.4, random_state=k, format="csr") + sp.eye(5 + k) for k in range(3)]
    viewer = PETSc.Viewer().createBinary(str(path), mode="a", comm=PETSc.COMM_SELF)
    for M in matrices:
        A = PETSc.Mat().createAIJ(M.shape, csr=(M.indptr, M.indices, M.data), comm=PETSc.COMM_SELF)
        A.view(viewer)
        A.destroy()
    viewer.destroy()
    pieces = split_binary(path, MAT_FILE_CLASSID)
    assert len(pieces) == 3
    for k, (piece, M) in enumerate(zip(pieces, matrices)):
        where = tmp_path / f"s{k}"
        where.mkdir()
        (where / "A.bin").write_bytes(piece)
        A, b = load_system(where)
        assert (A != M).nnz == 0 and np.all(b == 1.0)
    with pytest.raises(ValueError, match="expected 1211214"):
        split_binary(path, VEC_FILE_CLASSID)
    vector = tmp_path / "b.bin"
    write_petsc_binary(PETSc.Vec().createWithArray(np.arange(4.0), comm=PETSc.COMM_SELF), str(vector))
    vector.write_bytes(vector.read_bytes()[:-8])
    with pytest.raises(ValueError, match="runs past the end"):
        split_binary(vector, VEC_FILE_CLASSID)


@pytest.fixture(scope="module")
def legacy_programs() -> Path:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(LEGACY_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the legacy programs failed:\n{result.stdout}\n{result.stderr}"
    return LEGACY_DIR


@pytest.mark.compiled
def test_record_collects_every_solve_of_a_run_under_its_prefix(legacy_programs, tmp_path):
    """heat_stepper solves once per step under the prefix heat_: each solve becomes a system."""
    command = [str(legacy_programs / "heat_stepper"), "-n", "8", "-steps", "3", "-dt", "0.01",
               "-heat_ksp_type", "cg", "-heat_pc_type", "jacobi"]
    with pytest.raises(RuntimeError, match="pass --prefix"):
        record(command, tmp_path / "wrong")
    recording = record(command, tmp_path / "rec", prefix="heat_")
    assert len(recording.systems) == 3 and recording.total_systems == 3
    assert (recording.ksp_type, recording.pc_type) == ("cg", "jacobi")
    first, last = load_system(recording.systems[0]), load_system(recording.systems[-1])
    assert first[0].shape == (64, 64) and (first[0] != last[0]).nnz == 0  # one step matrix, every step
    assert not np.allclose(first[1], last[1])                            # each step's own right-hand side
    meta = json.loads((recording.systems[1] / "system.json").read_text())
    assert meta["solve"] == 1 and meta["arguments"]["steps"] == "3"


@pytest.mark.compiled
@pytest.mark.slow
def test_record_train_predict_in_three_commands(legacy_programs, tmp_path):
    """The user's story on legacy_solver: `metasolve record` (once per run), `metasolve train` on the
    starter config exactly as written, `metasolve predict --matrix`, then the program with the
    options file: it converges with the learned ω, and faster than the recorded solver's ω = 1."""
    from metasolve.app.cli import main
    from metasolve.app.config import load_config

    out = tmp_path / "rec"
    program = str(legacy_programs / "legacy_solver")
    for n, contrast in ((10, 0.5), (12, 1.0), (14, 1.5), (16, 0.8), (11, 0.3), (13, 1.2)):
        assert main(["record", "--out", str(out), "--", program, "-n", str(n), "-contrast", str(contrast),
                     "-ksp_type", "richardson", "-pc_type", "sor", "-pc_sor_forward"]) == 0
    systems = sorted((out / "systems").iterdir())
    assert [p.name for p in systems] == [f"r{r:04d}-s0000" for r in range(6)]
    A, b = load_system(systems[-1])
    assert A.shape == (169, 169) and b.shape == (169,)  # the last run: -n 13
    config = load_config(out / "train.toml")
    assert config["problem"]["family"] == "recorded" and "pc_sor_omega" in config["space"]
    # 6 systems: 1 evaluates (the last), 2 train, the 2 after them validate the supervised start
    assert (config["problem"]["train_tasks"], config["problem"]["eval_tasks"]) == (2, 1)

    assert main(["train", str(out / "train.toml")]) == 0
    model = Path(config["train"]["out"]) / "meta_solver.pt"
    assert main(["predict", str(model), "--out", str(tmp_path / "job"), "--matrix", str(systems[-1] / "A.bin"),
                 "--rhs", str(systems[-1] / "b.bin")]) == 0
    options = (tmp_path / "job" / "metasolve.opts").read_text()
    omega = float(next(line.split()[1] for line in options.splitlines() if line.startswith("-pc_sor_omega")))
    assert 1.0 < omega < 1.98
    runs = {}
    for name, extra in (("learned", ["-options_file", str(tmp_path / "job" / "metasolve.opts")]),
                        ("recorded", ["-ksp_type", "richardson", "-pc_type", "sor", "-pc_sor_forward",
                                      "-ksp_monitor", "ascii:/dev/null", "-ksp_rtol", "1e-6"])):
        result = subprocess.run([program, "-f", str(systems[-1] / "A.bin"), "-rhs", str(systems[-1] / "b.bin"),
                                 *extra, "-ksp_converged_reason"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        runs[name] = int(result.stdout.split("CONVERGED_RTOL iterations")[1].split()[0])
    assert runs["learned"] < runs["recorded"]




@pytest.mark.compiled
@pytest.mark.slow
def test_the_shipped_program_config_trains_evaluates_and_delivers(legacy_programs, tmp_path):
    """examples/heat_stepper.toml, shrunk, through the same `run` as `metasolve train`: a program
    run has no grid, no matrix — the evaluation table, the report and the delivery still come out."""
    from metasolve.app.config import load_config, override
    from metasolve.app.run import run

    config = override(load_config(REPO / "examples" / "heat_stepper.toml"),
                      {"problem.train_tasks": 4, "problem.eval_tasks": 2, "train.steps": 1, "train.batch_size": 2,
                       "problem.params.arguments.n": {"integers": [8, 10]}, "problem.params.arguments.steps": 2})
    result = run(config, tmp_path / "out", quiet=True)
    assert len(result.evaluation["learned"]["settings"]) == 2
    assert all(1.0 < s["pc_sor_omega"] < 1.98 for s in result.evaluation["learned"]["settings"])
    assert (tmp_path / "out" / "meta_solver.delivery.json").is_file()
