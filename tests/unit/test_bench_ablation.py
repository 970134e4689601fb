"""The P x Φ operator ablation: every cell steps, two cells equal known optimizers, the suite writes its table."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt.bench import ablation, runner
from distopt.bench.workloads import make_workload


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wl():
    return make_workload("llama_char", quick=True)


def _steps(opt: torch.optim.Optimizer, model: torch.nn.Module, wl, n: int = 3) -> None:
    batches = wl.batches(1)
    for _ in range(n):
        batch = next(batches)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = wl.loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("p", ablation.P_CHOICES)
def test_every_cell_steps(wl, p):
    if p == "kronecker" and not ablation.kronecker_available():
        pytest.skip("shampoo is not registered")
    for phi in ablation.PHI_CHOICES:
        torch.manual_seed(0)
        model = wl.build(0)
        before = [q.detach().clone() for q in model.parameters()]
        opt = ablation.make_optimizer(ablation.cell_name(p, phi), model, ablation.BASE_LR[p], {})
        _steps(opt, model, wl, 2)
        assert all(torch.isfinite(q).all() for q in model.parameters())
        assert not torch.equal(before[1], list(model.parameters())[1]), (p, phi)  # a hidden matrix moved


def _hidden_and_rest(model):
    named = list(model.named_parameters())
    hidden = [q for n, q in named if q.ndim == 2 and not runner._is_io(n)]
    rest = [q for n, q in named if not (q.ndim == 2 and not runner._is_io(n))]
    return hidden, rest


def test_diagonal_ema_cell_is_adam(wl):
    torch.manual_seed(0)
    a, b = wl.build(0), wl.build(0)
    cell = ablation.make_optimizer(ablation.cell_name("diagonal", "ema"), a, 3e-3, {})
    hidden, rest = _hidden_and_rest(b)
    ref = torch.optim.Adam([{"params": hidden, "lr": 3e-3}, {"params": rest, "lr": ablation.REST_LR}], eps=1e-8)
    _steps(cell, a, wl)
    _steps(ref, b, wl)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_orthogonalized_nesterov_cell_is_muon(wl):
    a, b = wl.build(0), wl.build(0)
    cell = ablation.make_optimizer(ablation.cell_name("orthogonalized", "nesterov"), a, 2e-3, {})
    hidden, rest = _hidden_and_rest(b)
    muon = distopt.create("muon", [{"params": hidden}, {"params": rest, "use_muon": False}], lr=2e-3, momentum=0.9,
                          weight_decay=0.0, adjust_lr_fn="match_rms_adamw", ns_dtype=None,
                          adamw_lr=ablation.REST_LR, adamw_betas=(0.9, 0.999), adamw_eps=1e-8)
    _steps(cell, a, wl)
    _steps(muon, b, wl)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_bad_cell_name():
    with pytest.raises(ValueError, match="bad cell"):
        ablation.parse("ablation/P=kfac/Phi=ema")


def test_ablation_suite_writes_table(tmp_path, capsys):
    cells = [("identity", "none"), ("diagonal", "ema"), ("orthogonalized", "nesterov")]
    result = ablation.run(quick=True, seeds=1, cells=cells, progress=False, budget_scale=0.25,
                          cache=runner.Cache(tmp_path / "c"))
    assert set(result["cells"]) == {f"{p}|{phi}" for p, phi in cells}
    assert result["target"] is not None and result["budget"] == 10
    for cell in result["cells"].values():
        assert cell["tuned_lr"] is not None and len(cell["eval"]) == 1 and not cell["errors"]
        assert 0 < cell["test_mean"] < 5.0
    files = ablation.write(result, tmp_path / "out", plain=True)
    out = capsys.readouterr().out
    assert "orthogonalized" in out and "skipped" in out  # cells not run are shown as skipped
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "| diagonal |" in md and all(f.exists() for f in files)
