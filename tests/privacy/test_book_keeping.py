"""grad_sample_mode="ghost_bk" (distopt.privacy.book_keeping) with real Opacus: at σ = 0 the private
gradient equals the naive Σ_i min(1, C/(‖g_i‖ + 1e-6)) g_i from per-sample backward passes in
float64 and Opacus' two-pass ghost clipping, on an MLP (T = 1, in-place ReLU), a small
transformer-like model (Embedding with padding, LayerNorm, RMSNorm, 3-D Linear on both the ghost-norm
and the per-sample branch) and a CNN (Conv2d); one backward pass and no parameter gradient from
autograd; refusals; noise, accounting, DP-AdamBC, virtual steps and empty Poisson batches as
Opacus ghost. Opacus' own embedding norm counts padding positions: compared without padding."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distopt
from distopt.privacy import make_private
from privacy_helpers import clipped_sum, loader

pytest.importorskip("opacus")
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:Optimal order is the largest alpha", "ignore:Using a non-full backward")
VOCAB, DIM, N = 11, 8, 10


class TinyLM(nn.Module):
    """Embedding (padding 0) -> LayerNorm -> two 3-D Linears reading the same input (a gated unit: they share
    one Gram matrix in the ghost norm) -> causal running mean -> RMSNorm -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.ln = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.gate = nn.Linear(DIM, DIM, bias=False)
        self.rms = nn.RMSNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, VOCAB)
        with torch.no_grad():
            for m in (self.ln, self.rms):  # away from the (1, 0) initialisation
                m.weight.add_(0.3 * torch.randn(DIM))
            self.ln.bias.add_(0.3 * torch.randn(DIM))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.embed(ids))
        h = torch.tanh(self.proj(h)) * torch.sigmoid(self.gate(h))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        h = h + h.cumsum(1) / steps  # mixes positions: the per-sample gradient is not a sum of per-token ones
        return self.head(self.rms(h))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(inplace=True), nn.Linear(10, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3))


def make_data(kind: str, t: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 4.0, N, dtype=torch.float64)
    if kind == "lm":
        ids = torch.randint(0, VOCAB, (N, t), generator=g)
        ids[::3, 0] = 0  # some padding tokens
        ids[1, :] = ids[1, 0]  # a repeated token: the embedding's ghost norm sums over equal ids
        return ids, torch.randint(0, VOCAB, (N, t), generator=g)
    if kind == "cnn":
        return torch.randn(N, 2, 6, 6, generator=g, dtype=torch.float64) * scale.view(-1, 1, 1, 1), \
            torch.randint(0, 3, (N,), generator=g)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64) * scale.view(-1, 1)
    return x, torch.randint(0, 3, (N,), generator=g)


MODELS = {"mlp": mlp, "cnn": cnn, "lm": TinyLM}


def unpadded_lm() -> TinyLM:
    """TinyLM in float64 without a padding index, for comparisons with Opacus' ghost clipping (see
    test_opacus_ghost_overestimates_norms_with_padding)."""
    model = TinyLM().double()
    model.embed.padding_idx = None
    return model


def _loss(out: torch.Tensor, y: torch.Tensor, criterion=None, reduction: str = "mean"):
    if out.dim() == 3:  # a sequence: one privacy unit per sequence (Opacus' shape= convention)
        if criterion is not None:
            return criterion(out.flatten(0, 1), y.flatten(), shape=out.shape[:2])
        return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction)
    return criterion(out, y) if criterion is not None else nn.functional.cross_entropy(out, y, reduction=reduction)


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> list[list[torch.Tensor]]:
    """The gradient of loss_i (per-token mean for 'mean', sum for 'sum'), one backward pass per sample."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        o = model(x[i:i + 1])
        loss = _loss(o, y[i:i + 1], reduction=reduction if o.dim() == 3 else "sum")
        loss.backward()
        out.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                    for p in model.parameters() if p.requires_grad])
    model.zero_grad()
    return out


def private_grads(model: nn.Module, x, y, mode: str, c: float, reduction: str, sigma: float = 0.0, lr: float = 0.0,
                  seed: int = 0) -> tuple[list[torch.Tensor], object]:
    opt = distopt.create("sgd", [p for p in model.parameters() if p.requires_grad], lr=lr)
    crit = nn.CrossEntropyLoss(reduction=reduction)
    module, dp_opt, criterion, _ = make_private(
        model, opt, loader(x, y, len(x)), noise_multiplier=sigma, max_grad_norm=c, grad_sample_mode=mode,
        poisson_sampling=False, loss_reduction=reduction, criterion=crit,
        noise_generator=torch.Generator().manual_seed(seed))
    dp_opt.zero_grad()
    _loss(module(x), y, criterion).backward()
    dp_opt.step()
    scale = dp_opt.expected_batch_size if reduction == "mean" else 1
    return [p.grad * scale for p in dp_opt.params], dp_opt


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind,t", [("mlp", 1), ("cnn", 1), ("lm", 3), ("lm", 6)])
def test_clipped_sum_equals_naive_per_sample_and_opacus_ghost(kind: str, t: int, reduction: str) -> None:
    base = MODELS[kind]().double()
    if kind == "lm":
        base.ln.bias.requires_grad_(False)  # a frozen parameter of a supported layer
    x, y = make_data(kind, t)
    grads = per_sample_grads(copy.deepcopy(base), x, y, reduction)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in grads])
    c = float(norms.median())  # half the samples are clipped, half are not
    assert (norms > c * 1.05).sum() >= 3 and (norms < c * 0.95).sum() >= 3
    expected, _ = clipped_sum(grads, c, stabilizer=1e-6)  # Opacus' coefficient min(1, C / (‖g‖ + 1e-6))

    flags = [p.requires_grad for p in base.parameters()]
    model = copy.deepcopy(base)
    bk, _ = private_grads(model, x, y, "ghost_bk", c, reduction)
    assert [p.requires_grad for p in model.parameters()] == flags
    for got, want in zip(bk, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert len(bk) == len(expected) == sum(flags)

    opacus_model = copy.deepcopy(base)
    for m in opacus_model.modules():  # Opacus' full backward hooks refuse in-place ops on a layer's output
        if isinstance(m, nn.ReLU):
            m.inplace = False
    if kind == "lm":  # Opacus 1.6's embedding norm counts padding positions (rows nn.Embedding never updates)
        opacus_model.embed.padding_idx = None
        unpadded = copy.deepcopy(opacus_model)
        bk, _ = private_grads(unpadded, x, y, "ghost_bk", c, reduction)
    ghost, _ = private_grads(opacus_model, x, y, "ghost", c, reduction)
    for got, want in zip(bk, ghost):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_opacus_ghost_overestimates_norms_with_padding() -> None:
    """Why the comparison with Opacus drops padding_idx: Opacus' embedding norm includes the padding rows."""
    base = TinyLM().double()
    x, y = make_data("lm", 3)
    naive = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in per_sample_grads(copy.deepcopy(base), x, y,
                                                                                               "sum")])
    norms = {}
    for mode in ("ghost", "ghost_bk"):
        model = copy.deepcopy(base)
        module, _, criterion, _ = make_private(
            model, distopt.create("sgd", model.parameters(), lr=0.0), loader(x, y, N), noise_multiplier=0.0,
            max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False, loss_reduction="sum",
            criterion=nn.CrossEntropyLoss(reduction="sum"))
        _loss(module(x), y, criterion).backward()
        norms[mode] = module.per_sample_gradient_norms
    padded = (x == 0).any(1)
    torch.testing.assert_close(norms["ghost_bk"], naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norms["ghost"][~padded], naive[~padded], rtol=1e-10, atol=1e-12)
    assert padded.sum() >= 3 and (norms["ghost"][padded] > naive[padded] * 1.01).all()


def test_norms_are_the_per_sample_norms() -> None:
    base = TinyLM().double()
    x, y = make_data("lm", 6)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in per_sample_grads(copy.deepcopy(base), x, y,
                                                                                              "sum")])
    opt = distopt.create("sgd", base.parameters(), lr=0.0)
    module, dp_opt, criterion, _ = make_private(
        base, opt, loader(x, y, N), noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="ghost_bk",
        poisson_sampling=False, loss_reduction="sum", criterion=nn.CrossEntropyLoss(reduction="sum"))
    _loss(module(x), y, criterion).backward()
    torch.testing.assert_close(module.per_sample_gradient_norms, norms, rtol=1e-10, atol=1e-12)


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        _CountBackward.calls += 1
        return g


@pytest.mark.parametrize("mode,passes,param_grads", [("ghost_bk", 1, 0), ("ghost", 2, 2)])
def test_one_backward_pass_and_no_parameter_gradient_from_autograd(mode: str, passes: int, param_grads: int) -> None:
    model = TinyLM().double()
    x, y = make_data("lm", 3)
    seen = []
    # a parameter's tensor hook fires whenever autograd computes that parameter's gradient
    handles = [p.register_hook(lambda g: seen.append(1)) for p in model.parameters()]
    opt = distopt.create("sgd", model.parameters(), lr=0.0)
    module, dp_opt, criterion, _ = make_private(model, opt, loader(x, y, N), noise_multiplier=0.0, max_grad_norm=1.0,
                                                grad_sample_mode=mode, poisson_sampling=False)
    _CountBackward.calls = 0
    dp_opt.zero_grad()
    _loss(_CountBackward.apply(module(x)), y, criterion).backward()
    assert _CountBackward.calls == passes
    assert len(seen) == param_grads * len(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    for h in handles:
        h.remove()


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def _make(model: nn.Module, **kwargs):
    x, y = make_data("mlp")
    opt = distopt.create("sgd", model.parameters(), lr=0.0)
    return make_private(model.double(), opt, loader(x, y, N), noise_multiplier=0.0, max_grad_norm=1.0,
                        grad_sample_mode="ghost_bk", poisson_sampling=False, **kwargs)


def test_unsupported_layer_is_refused_with_the_alternatives() -> None:
    with pytest.raises(NotImplementedError, match=r"module 1 of type Scale.*grad_sample_mode='ghost'.*'hooks'"):
        _make(nn.Sequential(nn.Linear(6, 3), Scale()))
    frozen = nn.Sequential(nn.Linear(6, 3), Scale())
    frozen[1].s.requires_grad_(False)
    _make(frozen)  # a frozen unsupported layer is fine
    with pytest.raises(NotImplementedError, match="groups"):
        _make(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(NotImplementedError, match="shared"):
        _make(tied)
    with pytest.raises(ValueError, match="Unsupported combination"):  # Opacus: ghost clipping is flat only
        _make(mlp(), clipping="per_layer")


def test_noised_step_equals_opacus_ghost_with_the_same_generator() -> None:
    base = unpadded_lm()
    x, y = make_data("lm", 6)
    after = {}
    for mode in ("ghost", "ghost_bk"):
        model = copy.deepcopy(base)
        _, dp_opt = private_grads(model, x, y, mode, 0.5, "mean", sigma=1.3, lr=0.1, seed=7)
        after[mode] = [p.detach().clone() for p in model.parameters()]
        assert dp_opt.privacy.steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(after["ghost"], base.parameters()))
    for a, b in zip(after["ghost"], after["ghost_bk"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_virtual_steps_accounting_and_empty_batches() -> None:
    results = []
    for physical in (N, 3):
        model = mlp().double()
        x, y = make_data("mlp")
        opt = distopt.create("adamw", model.parameters(), lr=1e-2)
        module, dp_opt, criterion, dl = make_private(model, opt, loader(x, y, N), noise_multiplier=0.0,
                                                     max_grad_norm=1.0, grad_sample_mode="ghost_bk",
                                                     poisson_sampling=False)
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=physical, optimizer=dp_opt) as virtual:
            for xb, yb in virtual:
                dp_opt.zero_grad()
                criterion(module(xb), yb).backward()
                dp_opt.step()
        assert dp_opt.privacy.steps == 1
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    model = mlp().double()  # Poisson sampling at a tiny rate: empty batches step (noise only) and are accounted
    x, y = make_data("mlp")
    module, dp_opt, criterion, dl = make_private(model, distopt.create("sgd", model.parameters(), lr=0.1),
                                                 loader(x, y, 1), noise_multiplier=1.0, max_grad_norm=1.0,
                                                 grad_sample_mode="ghost_bk")
    for xb, yb in dl:
        dp_opt.zero_grad()
        criterion(module(xb), yb).backward()
        dp_opt.step()
    assert dp_opt.privacy.steps == N and dp_opt.privacy_spent()[0] > 0
    assert "privacy" in dp_opt.state_dict()


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used, self.unused = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)  # runs, but does not reach the loss
        return self.used(x)


def test_a_layer_off_the_loss_path_gets_a_zero_gradient_and_eval_forward_is_refused() -> None:
    model = _Branches().double()
    x, y = make_data("mlp")
    reference, _ = clipped_sum(per_sample_grads(copy.deepcopy(model), x, y, "sum"), 1.0, stabilizer=1e-6)
    module, dp_opt, criterion, _ = _make(model)
    dp_opt.zero_grad()
    criterion(module(x), y).backward()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)  # before step: Σ_i c_i g_i
    assert all(float(p.grad.abs().max()) == 0 for p in model.unused.parameters())
    module.eval()
    with pytest.raises(RuntimeError, match="train mode"):
        criterion(module(x), y).backward()


def test_bias_corrected_adam_training_and_checkpoint_equal_opacus_ghost() -> None:
    base = unpadded_lm()
    x, y = make_data("lm", 6)
    runs = {}
    for mode in ("ghost", "ghost_bk"):
        model = copy.deepcopy(base)
        opt = distopt.create("adamw", model.parameters(), lr=1e-2)
        module, dp_opt, criterion, dl = make_private(
            model, opt, loader(x, y, 5), noise_multiplier=0.8, max_grad_norm=0.5, grad_sample_mode=mode,
            poisson_sampling=False, bias_correction=True, accountant="rdp",
            noise_generator=torch.Generator().manual_seed(3))
        for _ in range(2):
            for xb, yb in dl:
                dp_opt.zero_grad()
                _loss(module(xb), yb, criterion).backward()
                dp_opt.step()
        runs[mode] = ([p.detach().clone() for p in model.parameters()], dp_opt.privacy_spent(), dp_opt.state_dict())
    (p_ghost, eps_ghost, state_ghost), (p_bk, eps_bk, state_bk) = runs["ghost"], runs["ghost_bk"]
    for a, b in zip(p_ghost, p_bk):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert eps_bk == eps_ghost
    assert state_bk["privacy"]["history"] == state_ghost["privacy"]["history"] == [[0.8, 0.5, 4]]


def test_noise_is_added_in_place_and_virtual_steps_keep_their_sum() -> None:
    """ghost_bk's step adds the noise in the gradient's own storage (no full-size copy: InPlaceNoiseMixin),
    and with BatchMemoryManager micro-batches (zero_grad(set_to_none=False) in between, which clears
    p.grad in place) the noised step still equals Opacus' ghost with the same generator."""
    base = unpadded_lm()
    x, y = make_data("lm", 6)
    after, aliased = {}, {}
    for mode in ("ghost", "ghost_bk"):
        model = copy.deepcopy(base)
        opt = distopt.create("sgd", model.parameters(), lr=0.1)
        module, dp_opt, criterion, dl = make_private(model, opt, loader(x, y, N), noise_multiplier=1.3,
                                                     max_grad_norm=0.5, grad_sample_mode=mode, poisson_sampling=False,
                                                     noise_generator=torch.Generator().manual_seed(3))
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=3, optimizer=dp_opt) as virtual:
            for xb, yb in virtual:
                dp_opt.zero_grad(set_to_none=False)
                _loss(module(xb), yb, criterion).backward()
                dp_opt.step()
        assert dp_opt.privacy.steps == 1
        aliased[mode] = all(p.grad.data_ptr() == p.summed_grad.data_ptr() for p in dp_opt.params)
        after[mode] = [p.detach().clone() for p in model.parameters()]
    assert aliased == {"ghost": False, "ghost_bk": True}
    assert any(not torch.equal(a, b) for a, b in zip(after["ghost"], base.parameters()))
    for a, b in zip(after["ghost"], after["ghost_bk"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
