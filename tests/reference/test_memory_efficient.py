"""adamw8bit, galore, apollo and apollo_mini against independent references, float64.

References (each a small torch.optim.Optimizer written here, one tensor at a time, from the
papers; the packages are extra checks, skipped when not installed):

- adamw8bit: ``NaiveAdamW8bit``, block-wise 8-bit AdamW (Dettmers et al., ICLR 2022) with its
  own quantizer (a code map decoded bit pattern by bit pattern, an explicit loop over blocks,
  argmin of distances): exact. Then torch.optim.AdamW, to bound the quantization error of
  the trajectory, and bitsandbytes' AdamW8bit on CPU (loose: bitsandbytes' CPU quantizer
  does not round to the *nearest* map value for small magnitudes, see
  ``test_adamw8bit_close_to_bitsandbytes``).
- galore: ``NaiveGaLore``, Algorithm 2 of Zhao et al. (ICML 2024) with Adam's usual bias
  correction and torch.optim.AdamW's decoupled weight decay: exact. galore-torch 1.0
  (``GaLoreAdamW``) differs from the paper (ε added to sqrt(V) before the bias correction;
  weight decay applied to the already-updated weights; SVD always in float32), so it is
  compared with ε = 0 and weight_decay = 0, in float32 (where both take the SVD in float32).
- apollo / apollo_mini: ``NaiveApollo``, Algorithm 1 of Zhu et al. (MLSys 2025) + the
  norm-growth limiter, with the same seeded projections: exact. apollo-torch 1.0.3
  (``APOLLOAdamW``) multiplies by sqrt(scale), folds the bias corrections into the step size
  after the limiter, adds 1e-8 to the ratio's denominator and decays the updated weights, so
  it is compared with ε = 0, weight_decay = 0, the limiter off, scale = α², and our seeds
  patched to its seed chain; tolerance 1e-6 (its 1e-8 in the denominator).
"""
from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import distopt
import distopt.preconditioners.apollo_scaling as apollo_scaling
import parity
from distopt.preconditioners.apollo_scaling import projection_seed
from distopt.scenarios.quantization import dequantize_blockwise, dynamic_map, quantize_blockwise
from parity import assert_parity

FOREACH = pytest.mark.parametrize("foreach", [True, False])


def ours(name: str, foreach: bool = True, **kwargs: Any):
    return lambda groups: distopt.create(name, groups, foreach=foreach, **kwargs)


def adamw_step(p: torch.Tensor, g: torch.Tensor, st: dict, lr: float, b1: float, b2: float, eps: float,
               wd: float, t: int) -> None:
    """torch.optim.AdamW's update written out (float moments in ``st``)."""
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g * g
    m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
    p.copy_(p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))


# ---------------------------------------------------------------------------------------------
# adamw8bit
# ---------------------------------------------------------------------------------------------

def decoded_map(signed: bool) -> torch.Tensor:
    """The dynamic tree map decoded from each of the 256 bit patterns: [sign] e zeros (decimal
    exponent 10^-e), an indicator 1, F fraction bits (bin k of 2^F linear bins of [0.1, 1],
    value at the bin's midpoint, computed in float32 as bitsandbytes does); the pattern
    with no indicator bit is 0, and the one that would be -0 (signed) or 10^-7 (unsigned) is 1."""
    values = []
    for byte in range(256):
        bits = f"{byte:08b}"
        sign, body = (-1.0 if bits[0] == "1" else 1.0, bits[1:]) if signed else (1.0, bits)
        e = len(body) - len(body.lstrip("0"))
        if e == len(body):
            values.append(torch.tensor(1.0 if sign < 0 else 0.0))
            continue
        fraction = body[e + 1:]
        if not signed and e == 7:
            values.append(torch.tensor(1.0))
            continue
        bins = 2 ** len(fraction)
        k = int(fraction, 2) if fraction else 0
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float32)
        values.append(sign * (10.0**-e * ((edges[k] + edges[k + 1]) / 2)))
    return torch.stack(values).to(torch.float32).sort().values


class NaiveAdamW8bit(torch.optim.Optimizer):
    """Block-wise 8-bit AdamW, one tensor and one block at a time: dequantize m, v; AdamW step
    with the fresh moments (decoupled wd, torch's ε placement); quantize m (signed map), v
    (unsigned map) per block of ``block_size`` flat elements: scale = float32(max |x|),
    code = argmin_k |x / scale - Q[k]|. Tensors below ``min_8bit_size`` elements: plain AdamW."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, block_size=256,
                 min_8bit_size=4096) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                                      min_8bit_size=min_8bit_size))
        self.maps = {s: decoded_map(s).to(torch.float64) for s in (True, False)}

    def quantize(self, x: torch.Tensor, signed: bool, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flat, q, out = x.reshape(-1), self.maps[signed], []
        for start in range(0, flat.numel(), size):
            block = flat[start:start + size]
            scale = block.abs().max().to(torch.float32).to(torch.float64)
            normed = block / scale if scale > 0 else torch.zeros_like(block)
            out.append((torch.argmin((normed[:, None] - q[None, :]).abs(), dim=1), scale))
        return out

    def dequantize(self, blocks: list, signed: bool, shape: torch.Size) -> torch.Tensor:
        return torch.cat([self.maps[signed][codes] * scale for codes, scale in blocks]).reshape(shape)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                small = p.numel() < group["min_8bit_size"]
                if not st:
                    st["t"] = 0
                    st["m"] = torch.zeros_like(p, dtype=torch.float64)
                    st["v"] = torch.zeros_like(p, dtype=torch.float64)
                st["t"] += 1
                if not small and st["t"] > 1:
                    st["m"] = self.dequantize(st["qm"], True, p.shape)
                    st["v"] = self.dequantize(st["qv"], False, p.shape)
                adamw_step(p, p.grad, st, group["lr"], b1, b2, group["eps"], group["weight_decay"], st["t"])
                if not small:
                    st["qm"] = self.quantize(st["m"], True, group["block_size"])
                    st["qv"] = self.quantize(st["v"], False, group["block_size"])


GROUPS_8BIT = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, block_size=16, min_8bit_size=0),
               dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0, block_size=7, min_8bit_size=5)]


def test_code_maps_decode_from_bit_patterns() -> None:
    for signed in (True, False):
        ref = decoded_map(signed)
        assert torch.equal(dynamic_map(signed), ref)
        assert ref.unique().numel() == 256 and ref.max() == 1.0
    assert dynamic_map(True).min() < -0.99 and dynamic_map(False).min() == 0.0
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnbf.create_dynamic_map(signed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_quantization_error_bound(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1000, generator=g, dtype=torch.float64) * torch.rand(1000, generator=g, dtype=torch.float64) ** 4)
    x = x.to(dtype)
    x[256:512] = 0.0  # a zero block
    for signed, data in ((True, x), (False, x.abs())):
        codes, absmax = torch.zeros(1000, dtype=torch.uint8), torch.zeros(4)
        quantize_blockwise(data, 256, signed, codes, absmax)
        back = dequantize_blockwise(codes, absmax, 256, signed, dtype)
        q = dynamic_map(signed).to(torch.float64)
        half_gap = ((q[1:] - q[:-1]).max() / 2).item()
        for b in range(4):
            blk = slice(256 * b, 256 * (b + 1))
            assert absmax[b] == data[blk].abs().max().float()
            err = (back[blk].double() - data[blk].double()).abs().max().item()
            assert err <= (half_gap + 1e-6) * absmax[b].item()  # + float32 rounding of Q·absmax
        assert torch.equal(back[256:512], torch.zeros(256, dtype=back.dtype))


@FOREACH
def test_adamw8bit_naive(foreach: bool) -> None:
    assert_parity(f"adamw8bit (foreach={foreach})", ours("adamw8bit", foreach), lambda gs: NaiveAdamW8bit(gs),
                  GROUPS_8BIT, reference="naive 8-bit blockwise AdamW loop")


def _regression(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 96, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_()
    b = torch.zeros(64, dtype=dtype, requires_grad=True)
    x = torch.randn(256, 96, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(256, 64, generator=g, dtype=torch.float64).to(dtype)
    return [w, b], lambda: ((x @ w.T + b - y) ** 2).mean()


def _train(factory, dtype: torch.dtype, steps: int = 100) -> tuple[list[torch.Tensor], float]:
    params, loss = _regression(dtype)
    opt = factory(params)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return [p.detach().clone() for p in params], loss().item()


def test_adamw8bit_close_to_adamw() -> None:
    """Quantization error of the trajectory (a 64x96 matrix: 24 blocks of 256, and a 64-bias
    kept in float32 moments), lr 1e-2, wd 0.1, 100 steps, float64: measured parameter deviation
    1.5% of the parameters' displacement and 5e-6 relative in the loss; bounds 3% and 1e-4."""
    start = [p.detach() for p in _regression(torch.float64)[0]]
    ref, ref_loss = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), torch.float64)
    got, got_loss = _train(lambda ps: distopt.create("adamw8bit", ps, lr=1e-2, weight_decay=0.1), torch.float64)
    displacement = max((r - s).abs().max().item() for r, s in zip(ref, start))
    deviation = max((a - b).abs().max().item() for a, b in zip(got, ref)) / displacement
    parity.RESULTS.append(("adamw8bit vs AdamW (dev / displacement)", "torch.optim.AdamW, fp64 moments", deviation))
    assert 0 < deviation <= 0.03
    assert abs(got_loss - ref_loss) <= 1e-4 * ref_loss


def test_adamw8bit_close_to_bitsandbytes() -> None:
    """bitsandbytes 0.50's AdamW8bit on CPU, float32, same setting: measured deviation 0.2% of the
    displacement (its CPU quantizer maps some small normalized values to a farther code than
    the nearest, so the two are not bit-equal); bound 1%."""
    bnb = pytest.importorskip("bitsandbytes")
    start = [p.detach() for p in _regression(torch.float32)[0]]
    ref, ref_loss = _train(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.1), torch.float32)
    got, got_loss = _train(lambda ps: distopt.create("adamw8bit", ps, lr=1e-2, weight_decay=0.1), torch.float32)
    displacement = max((r - s).abs().max().item() for r, s in zip(ref, start))
    deviation = max((a - b).abs().max().item() for a, b in zip(got, ref)) / displacement
    parity.RESULTS.append(("adamw8bit vs bnb (dev / displacement)", "bitsandbytes AdamW8bit (CPU, fp32)", deviation))
    assert deviation <= 0.01
    assert abs(got_loss - ref_loss) <= 1e-4 * ref_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adamw8bit_state_round_trip_is_exact(dtype: torch.dtype) -> None:
    def make():
        params, loss = _regression(dtype)
        return params, loss, distopt.create("adamw8bit", params, lr=1e-2, weight_decay=0.1)

    params, loss, opt = make()
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    params2, loss2, opt2 = make()
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    for p, p2 in zip(params, params2):
        for key, value in opt.state[p].items():
            assert value.dtype == opt2.state[p2][key].dtype and torch.equal(value, opt2.state[p2][key]), key
    w_state = opt.state[params[0]]
    assert w_state["exp_avg_codes"].dtype == torch.uint8 and w_state["exp_avg_absmax"].dtype == torch.float32
    assert opt.state[params[1]]["exp_avg"].dtype == torch.promote_types(dtype, torch.float32)
    for o, ps, lf in ((opt, params, loss), (opt2, params2, loss2)):
        for _ in range(3):
            o.zero_grad()
            lf().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_adamw8bit_bfloat16_8bit_path_keeps_dtype_and_converges() -> None:
    params, loss = _regression(torch.bfloat16)
    opt = distopt.create("adamw8bit", params, lr=1e-2, min_8bit_size=0)
    start = loss().item()
    for _ in range(100):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert "exp_avg_codes" in opt.state[params[1]]  # min_8bit_size=0 quantizes the bias too
    assert loss().item() < 0.7 * start


# ---------------------------------------------------------------------------------------------
# galore
# ---------------------------------------------------------------------------------------------

def side_of(m: int, n: int, proj_type: str) -> str:
    if proj_type == "std":
        return "left" if m < n else "right"
    if proj_type == "reverse_std":
        return "right" if m < n else "left"
    return proj_type


class NaiveGaLore(torch.optim.Optimizer):
    """GaLore Algorithm 2 for each matrix (ndim >= 2, viewed as (shape[0], -1)), AdamW for the rest:
    at steps t = 0, T, 2T, ... (counted from 0): U S Vᵀ = svd(G) (float64), P = U[:, :r] for a
    left projection, Vᵀ[:r] for a right one; R = PᵀG or G Pᵀ; Adam on R (bias-corrected, ε after
    the correction); G̃ = α (P N or N P); W <- W - lr·wd·W - lr·G̃."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
                 update_proj_gap=200, scale=0.25, proj_type="std", use_galore=True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                                      use_galore=use_galore))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["t"] = st.get("t", 0) + 1
                t = st["t"]
                if p.dim() < 2 or not group["use_galore"]:
                    st.setdefault("m", torch.zeros_like(p))
                    st.setdefault("v", torch.zeros_like(p))
                    adamw_step(p, p.grad, st, lr, b1, b2, eps, wd, t)
                    continue
                G = p.grad.reshape(p.shape[0], -1)
                m, n = G.shape
                side = side_of(m, n, group["proj_type"])
                r = min(group["rank"], m, n)
                if (t - 1) % group["update_proj_gap"] == 0:
                    U, S, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
                    st["P"] = (U[:, :r] if side == "left" else Vh[:r, :]).to(p.dtype)
                P = st["P"]
                R = P.T @ G if side == "left" else G @ P.T
                st.setdefault("m", torch.zeros_like(R))
                st.setdefault("v", torch.zeros_like(R))
                st["m"] = b1 * st["m"] + (1 - b1) * R
                st["v"] = b2 * st["v"] + (1 - b2) * R * R
                N = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)
                G_tilde = group["scale"] * (P @ N if side == "left" else N @ P)
                p.copy_(p * (1 - lr * wd) - lr * G_tilde.reshape(p.shape))


GROUPS_GALORE = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=7, scale=0.5),
                 dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0, rank=1, update_proj_gap=3, scale=0.25)]


@FOREACH
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_naive(foreach: bool, proj_type: str) -> None:
    groups = [{**g, "proj_type": proj_type} for g in GROUPS_GALORE]
    assert_parity(f"galore {proj_type} (foreach={foreach})", ours("galore", foreach), lambda gs: NaiveGaLore(gs),
                  groups, reference="naive GaLore-AdamW loop (paper Alg. 2)")


def test_galore_full_rank_group_and_adamw_group() -> None:
    """rank above min(m, n) is capped; ``use_galore=False`` is exactly AdamW."""
    groups = [{**GROUPS_GALORE[0], "rank": 50}, {**GROUPS_GALORE[1], "use_galore": False}]
    assert_parity("galore rank cap + use_galore=False", ours("galore"), lambda gs: NaiveGaLore(gs), groups,
                  reference="naive GaLore-AdamW loop (paper Alg. 2)")
    adamw_groups = [{k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")} for g in GROUPS_GALORE]
    assert_parity("galore use_galore=False", ours("galore", use_galore=False), lambda gs: torch.optim.AdamW(gs),
                  adamw_groups, reference="torch.optim.AdamW")


def _split_for_package(groups: list[dict], low_rank_keys: dict) -> list[dict]:
    """The packages project every param of a group that has a ``rank``: matrices and vectors
    go to separate groups (same order)."""
    out = []
    for g in groups:
        hp = {k: v for k, v in g.items() if k in ("lr", "betas", "eps", "weight_decay")}
        out.append({**hp, **{k: g[k] for k in low_rank_keys}, "params": [p for p in g["params"] if p.dim() >= 2]})
        out.append({**hp, "params": [p for p in g["params"] if p.dim() < 2]})
    return out


def test_galore_matches_galore_torch_package() -> None:
    galore_torch = pytest.importorskip("galore_torch")
    groups = [{**g, "eps": 0.0, "weight_decay": 0.0} for g in GROUPS_GALORE]
    keys = dict.fromkeys(("rank", "update_proj_gap", "scale", "proj_type"))
    assert_parity("galore vs galore-torch (fp32, eps=0, wd=0)", ours("galore"),
                  lambda gs: galore_torch.GaLoreAdamW(_split_for_package(gs, keys), no_deprecation_warning=True),
                  [{**g, "proj_type": "std"} for g in groups], reference="galore-torch 1.0 GaLoreAdamW",
                  tol=1e-5, steps=50, dtype=torch.float32)


def test_galore_svd_precision_for_bfloat16() -> None:
    w = torch.randn(12, 5, dtype=torch.bfloat16, requires_grad=True)
    opt = distopt.create("galore", [w], rank=2)
    w.grad = torch.randn(12, 5, dtype=torch.bfloat16)
    opt.step()
    _, _, vh = torch.linalg.svd(w.grad.float(), full_matrices=False)
    assert opt.state[w]["projector"].dtype == torch.bfloat16
    assert torch.equal(opt.state[w]["projector"], vh[:2].to(torch.bfloat16))
    assert w.dtype == torch.bfloat16 and opt.state[w]["exp_avg"].shape == (12, 2)


def test_galore_conv_weight_is_viewed_as_matrix() -> None:
    w = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    opt = distopt.create("galore", [w], rank=2, lr=1e-2)
    ref = NaiveGaLore([w.detach().clone().requires_grad_()], rank=2, lr=1e-2)
    for _ in range(5):
        g = torch.randn(6, 3, 2, 2, dtype=torch.float64)
        w.grad, ref.param_groups[0]["params"][0].grad = g, g.clone()
        opt.step()
        ref.step()
    assert opt.state[w]["projector"].shape == (6, 2) and opt.state[w]["exp_avg"].shape == (2, 12)
    torch.testing.assert_close(w.detach(), ref.param_groups[0]["params"][0].detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# apollo / apollo_mini
# ---------------------------------------------------------------------------------------------

class NaiveApollo(torch.optim.Optimizer):
    """APOLLO Algorithm 1 for each matrix, AdamW for the rest. P (left: (m, r); right: (r, n)) is
    ``torch.randn`` in float32 from ``projection_seed(seed, i, (t-1) // T)`` (i: position in the
    group) over sqrt(r); R = PᵀG or G Pᵀ; Adam on R; s per channel (an explicit loop over the
    columns of R for a left projection, rows for a right one) or per tensor; G̃ = G diag(s);
    limiter: if ||G̃|| > γ·prev (prev > 0): G̃ *= γ·prev/||G̃||; prev = ||G̃||;
    W <- W - lr·wd·W - lr·α·G̃."""

    def __init__(self, params: Any, channelwise: bool = True, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, rank=256, update_proj_gap=200, scale=1.0, proj_type="std",
                 norm_growth_limit=1.01, seed=0, use_apollo=True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                                      norm_growth_limit=norm_growth_limit, seed=seed, use_apollo=use_apollo))
        self.channelwise = channelwise

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                st["t"] = st.get("t", 0) + 1
                t = st["t"]
                if p.dim() < 2 or not group["use_apollo"]:
                    st.setdefault("m", torch.zeros_like(p))
                    st.setdefault("v", torch.zeros_like(p))
                    adamw_step(p, p.grad, st, lr, b1, b2, eps, wd, t)
                    continue
                G = p.grad.reshape(p.shape[0], -1)
                m, n = G.shape
                side = side_of(m, n, group["proj_type"])
                r = min(group["rank"], m, n)
                window = (t - 1) // group["update_proj_gap"]
                gen = torch.Generator().manual_seed(projection_seed(group["seed"], i, window))
                P = torch.randn((m, r) if side == "left" else (r, n), generator=gen, dtype=torch.float32)
                P = (P / math.sqrt(r)).to(p.dtype)
                R = P.T @ G if side == "left" else G @ P.T
                st.setdefault("m", torch.zeros_like(R))
                st.setdefault("v", torch.zeros_like(R))
                st["m"] = b1 * st["m"] + (1 - b1) * R
                st["v"] = b2 * st["v"] + (1 - b2) * R * R
                R_tilde = (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)
                G_tilde = torch.empty_like(G)
                if not self.channelwise:
                    G_tilde = G * (R_tilde.norm() / R.norm())
                elif side == "left":
                    for j in range(n):
                        G_tilde[:, j] = G[:, j] * (R_tilde[:, j].norm() / R[:, j].norm())
                else:
                    for j in range(m):
                        G_tilde[j, :] = G[j, :] * (R_tilde[j, :].norm() / R[j, :].norm())
                gamma = group["norm_growth_limit"]
                if gamma is not None:
                    norm = G_tilde.norm()
                    if "prev" in st and norm > gamma * st["prev"]:
                        G_tilde = G_tilde * (gamma * st["prev"] / norm)
                    st["prev"] = G_tilde.norm()
                p.copy_(p * (1 - lr * wd) - lr * group["scale"] * G_tilde.reshape(p.shape))


GROUPS_APOLLO = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=2, update_proj_gap=7, scale=0.5,
                      seed=3),
                 dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0, rank=3, update_proj_gap=3, scale=2.0,
                      seed=11, norm_growth_limit=1.05)]


@FOREACH
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_apollo_naive(name: str, foreach: bool, proj_type: str) -> None:
    groups = [{**g, "proj_type": proj_type} for g in GROUPS_APOLLO]
    if name == "apollo_mini":
        groups[0]["rank"] = 1
    assert_parity(f"{name} {proj_type} (foreach={foreach})", ours(name, foreach),
                  lambda gs: NaiveApollo(gs, channelwise=name == "apollo"), groups,
                  reference="naive APOLLO loop (paper Alg. 1 + limiter)")


def test_apollo_limiter_off_and_adamw_group() -> None:
    groups = [{**GROUPS_APOLLO[0], "norm_growth_limit": None}, {**GROUPS_APOLLO[1], "use_apollo": False}]
    assert_parity("apollo limiter off + use_apollo=False", ours("apollo"), lambda gs: NaiveApollo(gs), groups,
                  reference="naive APOLLO loop (paper Alg. 1)")


def test_apollo_limiter_is_active() -> None:
    """The limiter changes the trajectory here (the test above is not vacuous about it)."""
    on = parity.run(ours("apollo"), GROUPS_APOLLO, steps=30)
    off = parity.run(ours("apollo"), [{**g, "norm_growth_limit": None} for g in GROUPS_APOLLO], steps=30)
    assert parity.max_rel_deviation(on, off) > 1e-6


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_apollo_matches_apollo_torch_package(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    apollo_torch = pytest.importorskip("apollo_torch")
    from apollo_torch.random_projector import next_seed

    def package_seed(seed: int, index: int, window: int) -> int:
        s = seed + index + 1  # the package seeds a param with its 1-based global position ...
        for _ in range(window):  # ... and advances the seed at every refresh
            s = next_seed(s)
        return s

    monkeypatch.setattr(apollo_scaling, "projection_seed", package_seed)
    groups = [{**g, "eps": 0.0, "weight_decay": 0.0, "norm_growth_limit": None, "proj_type": "std"}
              for g in GROUPS_APOLLO]
    groups[0]["seed"], groups[1]["seed"] = 0, 2  # package positions: W1 = 1, b1 = 2, W2 = 3, b2 = 4
    if name == "apollo_mini":
        for g in groups:
            g["rank"] = 1
    keys = dict.fromkeys(("rank", "update_proj_gap", "proj_type"))
    scale_type = "channel" if name == "apollo" else "tensor"

    def package(gs: list[dict]) -> torch.optim.Optimizer:
        split = _split_for_package(gs, keys)
        for g, src in zip(split[::2], gs):
            g.update(proj="random", scale_type=scale_type, scale=src["scale"] ** 2)
        return apollo_torch.APOLLOAdamW(split, disable_nl=True)

    assert_parity(f"{name} vs apollo-torch (eps=0, wd=0, no limiter)", ours(name), package, groups,
                  reference="apollo-torch 1.0.3 APOLLOAdamW", tol=1e-6)


def test_apollo_projection_is_regenerated_not_stored() -> None:
    w = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    opt = distopt.create("apollo", [w], rank=2, update_proj_gap=2)
    w.grad = torch.randn(4, 10, dtype=torch.float64)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq", "scaled_grad_norm"}
    assert opt.state[w]["exp_avg"].shape == (2, 10)
    seeds = [projection_seed(0, 0, k) for k in range(3)] + [projection_seed(1, 0, 0), projection_seed(0, 1, 0)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**64 for s in seeds)


# ---------------------------------------------------------------------------------------------
# hyperparameters, state accounting
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, key, value", [
    ("adamw8bit", "block_size", 0), ("adamw8bit", "block_size", 2.5), ("adamw8bit", "min_8bit_size", -1),
    ("galore", "rank", 0), ("galore", "rank", 1.5), ("galore", "update_proj_gap", 0), ("galore", "scale", -1.0),
    ("galore", "proj_type", "full"), ("galore", "use_galore", 1),
    ("apollo", "rank", 0), ("apollo", "update_proj_gap", 0), ("apollo", "norm_growth_limit", 0.5),
    ("apollo", "seed", -1), ("apollo_mini", "rank", True), ("apollo_mini", "scale", float("nan")),
])
def test_invalid_hyperparameters(name: str, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        distopt.create(name, [torch.zeros(2, 2, requires_grad=True)], **{key: value})


def gpt_like_params(vocab: int = 1536, d: int = 128, ctx: int = 128, layers: int = 4) -> list[torch.Tensor]:
    """A GPT-2-shaped parameter list (tied head): about 1.0M parameters."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return [torch.zeros(s, requires_grad=True) for s in shapes]


def expected_state_bytes(name: str, params: list[torch.Tensor], rank: int) -> int:
    """The state each algorithm keeps, from the shapes (float32 params: 4 bytes)."""
    total = 0
    for p in params:
        if name == "adamw8bit" and p.numel() >= 4096:
            total += 2 * p.numel() + 2 * 4 * -(-p.numel() // 256)  # uint8 codes + a float32 absmax per 256
            continue
        if p.dim() < 2 or name == "adamw8bit":
            total += 2 * 4 * p.numel()  # float32 exp_avg, exp_avg_sq (AdamW, or 8-bit AdamW's small tensors)
            continue
        m, n = p.shape[0], p.numel() // p.shape[0]
        r = min(rank, m, n)
        low = r * n if m < n else m * r  # the projection acts on the smaller side
        if name == "galore":
            total += 4 * (m * r if m < n else r * n) + 2 * 4 * low  # projector + 2 moments
        elif name == "apollo":
            total += 2 * 4 * low + 4  # 2 moments + the limiter's norm; no projector
        elif name == "apollo_mini":
            total += 2 * 4 * max(m, n) + 4  # rank 1
    return total


@pytest.mark.parametrize("name", ["adamw8bit", "galore", "apollo", "apollo_mini"])
def test_state_bytes_match_the_algorithm(name: str) -> None:
    params = gpt_like_params()
    rank = 1 if name == "apollo_mini" else 32
    kwargs = {} if name == "adamw8bit" else {"rank": rank}
    opt = distopt.create(name, params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    numel = sum(p.numel() for p in params)
    measured = distopt.state_bytes(opt)
    assert measured == expected_state_bytes(name, params, rank)
    parity.RESULTS.append((f"{name} state bytes/param (GPT-like, {numel} params)", f"rank {rank}" if kwargs else "",
                           measured / numel))
    if name == "adamw8bit":
        assert measured / numel <= 2.1
        assert 1_000_000 <= numel <= 1_100_000


@pytest.mark.parametrize("name, kwargs", [
    ("adamw8bit", dict(lr=5e-2, min_8bit_size=0, block_size=64)),
    ("galore", dict(lr=0.2, rank=4, update_proj_gap=10)),
    ("apollo", dict(lr=5e-2, rank=4, update_proj_gap=10)),
    ("apollo_mini", dict(lr=1e-2, update_proj_gap=10)),
])
def test_converges_with_low_rank_or_8bit_state(name: str, kwargs: dict) -> None:
    """min ||X Wᵀ + b - Y||² with W (16, 24) at rank 4 (1 for apollo_mini) or with every tensor
    8-bit quantized: below 2% of the starting loss in 300 steps."""
    g = torch.Generator().manual_seed(5)
    w_star = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(128, 24, generator=g, dtype=torch.float64)
    w = torch.zeros(16, 24, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(16, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        return ((x @ w.T + b - x @ w_star.T) ** 2).mean()

    opt = distopt.create(name, [w, b], **kwargs)
    start = loss().item()
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.02 * start
