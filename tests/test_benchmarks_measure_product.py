"""Benchmarks measure the product: a section that trains starts from a config and runs it through
`metasolve.app.run.run`, the recipe `metasolve train` runs, so its numbers are what a user's config
gets. Only the estimator-science and timing-of-machinery sections may assemble the internals
(`Trainer`, `BlackBox`, `build_experiment`, the pretraining steps) — they measure those parts,
not a config's result. And the import graph has no arrow up: nothing in `metasolve/` imports
`benchmarks`, and no benchmark reaches a `metasolve` module through `importlib`, where no
import graph would show it.

Static checks on the source (`ast`), no benchmark is run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
HARNESS = {"__init__", "__main__", "run"}
"""Files of `benchmarks/` that are the harness, not sections."""

INTERNALS = {"Trainer", "BlackBox", "build_experiment", "pretrain", "supervised_start", "hand_over", "keep_better"}
"""What `run` assembles: a section holding any of these is building its own recipe."""

MAY_ASSEMBLE_INTERNALS = {
    "estimators": "gradient estimators compared through one BlackBox round",
    "estimator_training": "estimators compared inside the same training loop",
    "overhead": "the oracle's per-call overhead",
    "mpi_step": "the parts of one training step under mpiexec",
    "mpi_throughput": "solve throughput of the executors on 1/2/4 ranks",
    "scaling_model": "a model of one step's time, fitted to in-process measurements",
    "solve_loop": "the machine's parallel capacity for a fixed solve loop",
}
"""Estimator science and timing of machinery: the sections allowed to assemble internals."""

TRAINING_SECTIONS = {"newton", "initial_guess", "discrete", "executable", "heat_stepper", "options", "wall_model",
                     "tutorials", "scale", "end_to_end"}
"""Sections whose numbers are a trained predictor's: each must train through `run`."""


SECTIONS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem not in HARNESS)


def section(name: str) -> ast.Module:
    path = BENCHMARKS / f"{name}.py"
    return ast.parse(path.read_text(), str(path))


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> 'module.attribute' (or 'module') for every import anywhere in the file."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name
    return names


def called_names(tree: ast.Module) -> set[str]:
    """Names called directly (`f(...)`) or as an attribute (`x.f(...)`)."""
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                called.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                called.add(node.func.attr)
    return called


def internals_used(tree: ast.Module) -> set[str]:
    imported = {name.rsplit(".", 1)[-1] for name in imported_names(tree).values()}
    return (imported | called_names(tree)) & INTERNALS


def calls_the_run_layer(tree: ast.Module) -> bool:
    """The file imports `run` from `metasolve.app.run` (under any name) and calls it."""
    local = {name for name, source in imported_names(tree).items() if source == "metasolve.app.run.run"}
    return bool(local & called_names(tree))


def test_the_allow_list_names_real_sections_that_say_why():
    for name in MAY_ASSEMBLE_INTERNALS:
        assert name in SECTIONS, f"benchmarks/{name}.py is allowed to assemble internals but does not exist"
        docstring = ast.get_docstring(section(name)) or ""
        assert "internals" in docstring, (f"benchmarks/{name}.py assembles the library's internals: its docstring "
                                          f"must say so and why ({MAY_ASSEMBLE_INTERNALS[name]})")


@pytest.mark.parametrize("name", SECTIONS)
def test_only_estimator_science_assembles_internals(name):
    tree = section(name)
    if name in MAY_ASSEMBLE_INTERNALS:
        return
    used = internals_used(tree)
    assert not used, (f"benchmarks/{name}.py uses {sorted(used)}: a section that measures the product starts from "
                      f"a config and trains through metasolve.app.run.run (or, if it measures an estimator or the "
                      f"machinery, joins MAY_ASSEMBLE_INTERNALS with a docstring saying so)")
    assert "fit" not in called_names(tree) or calls_the_run_layer(tree), \
        f"benchmarks/{name}.py calls .fit( without the run layer: train through metasolve.app.run.run"


@pytest.mark.parametrize("name", sorted(TRAINING_SECTIONS))
def test_training_sections_train_through_the_run_layer(name):
    path = BENCHMARKS / f"{name}.py"
    if not path.exists():
        pytest.skip(f"benchmarks/{name}.py does not exist")
    assert calls_the_run_layer(section(name)), \
        f"benchmarks/{name}.py trains a predictor but never calls metasolve.app.run.run on a config"


def import_module_targets(tree: ast.Module) -> list[str]:
    """The first argument of every `import_module(...)` / `__import__(...)` call, as source text."""
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name = node.func.id if isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if name in ("import_module", "__import__"):
                targets.append(ast.unparse(node.args[0]))
    return targets


def test_metasolve_never_imports_benchmarks():
    for path in sorted((ROOT / "metasolve").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for source in imported_names(tree).values():
            assert source.split(".")[0] != "benchmarks", f"{path.relative_to(ROOT)} imports {source}: an arrow up"
        for target in import_module_targets(tree):
            assert "benchmarks" not in target, f"{path.relative_to(ROOT)} imports {target} through importlib"


@pytest.mark.parametrize("name", [path.stem for path in sorted(BENCHMARKS.glob("*.py"))])
def test_benchmarks_import_metasolve_only_by_import_statements(name):
    path = BENCHMARKS / f"{name}.py"
    tree = ast.parse(path.read_text(), str(path))
    for target in import_module_targets(tree):
        assert target.lstrip("f").strip("'\"").startswith("benchmarks."), \
            (f"{path.relative_to(ROOT)} imports {target} through importlib: import metasolve modules with an "
             f"import statement, so the import graph shows the edge")
    cli = [source for source in imported_names(tree).values() if source.startswith("metasolve.app.cli")]
    assert not cli, f"{path.relative_to(ROOT)} imports the CLI ({cli}): use metasolve.app.run"


def test_the_checks_see_what_they_look_for():
    """The detectors on small sources: a hand-built recipe is found, a config run is recognised."""
    hand_built = ast.parse("from metasolve import BlackBox, Trainer\nbox = BlackBox(1, 2, 3, 4)\n"
                           "Trainer(m, box, o).fit(tasks, 5, 2)\n")
    assert internals_used(hand_built) == {"BlackBox", "Trainer"}
    assert not calls_the_run_layer(hand_built)
    through_run = ast.parse("from metasolve.app.run import run as run_config\nresult = run_config(config, out)\n")
    assert internals_used(through_run) == set() and calls_the_run_layer(through_run)
    hidden = ast.parse("import importlib\ncli = importlib.import_module('metasolve.app.cli')\n")
    assert import_module_targets(hidden) == ["'metasolve.app.cli'"]


def test_the_keys_benchmarks_needed_refuse_what_they_cannot_do():
    """`[solver] prefix` and `[train] loss` (what heat_stepper needed to be a config): a prefix on
    an in-process solver, or a log of costs that can reach zero, is a clear error before any solve."""
    import torch

    from metasolve.app.config import parse_config
    from metasolve.app.experiment import LOSSES, build_experiment, build_oracle
    from metasolve.training.parallel import SerialExecutor

    base = '[problem]\nfamily = "poisson1d"\n[space.x0]\nkind = "vector"\nmodes = 4\n'
    prefixed = parse_config(base + '[solver]\nprefix = "heat_"\n', "<prefix>")
    with pytest.raises(ValueError, match="solver.prefix"):
        build_oracle(prefixed, SerialExecutor())
    logged = parse_config(base + '[train]\nloss = "log_mean"\n', "<loss>")  # cost: residual_area, which reaches 0
    with pytest.raises(ValueError, match="log_mean"):
        build_experiment(logged, SerialExecutor())
    values = torch.tensor([10.0, 1000.0], dtype=torch.float64)
    assert float(LOSSES["log_mean"](values)) == pytest.approx(0.5 * (torch.log(values).sum().item()))
    assert float(LOSSES["mean"](values)) == 505.0
