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
