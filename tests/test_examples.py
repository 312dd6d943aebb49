"""The examples run, and the PINN's loss goes down when trained through hessmlp.laplacian."""
import importlib.util
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pinn_poisson_quick(capsys):
    torch.manual_seed(0)
    result = _load("pinn_poisson").main(["--quick"])
    out = capsys.readouterr().out
    assert "final relative L2 error" in out and "step   100" in out
    history = result["history"]
    first_loss, last_loss = history[0][2], history[-1][2]
    assert last_loss < first_loss / 20, history
    assert history[-1][3] < history[0][3] / 5, history  # the error against the exact solution too


def test_bench_prints_threads_spread_and_verdict(capsys):
    from hessmlp import bench
    assert bench.main(["--batch", "32", "--min-run-time", "0.01", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{torch.get_num_threads()} threads" in out
    assert "spread over rounds" in out
    assert out.strip().splitlines()[-1].startswith("verdict: all 6 rows agree with torch.func")


def test_heat_equation_quick(capsys):
    """The heat-equation PINN (u_t by jacobian(wrt=[2]), u_xx + u_yy by laplacian(wrt=[0, 1]))
    learns: its PDE loss and its error against the exact solution go down."""
    torch.manual_seed(0)
    result = _load("heat_equation").main(["--quick"])
    out = capsys.readouterr().out
    assert "final relative L2 error" in out and "step   100" in out
    history = result["history"]
    assert history[-1][2] < history[0][2] / 20, history
    assert history[-1][3] < history[0][3] / 5, history
