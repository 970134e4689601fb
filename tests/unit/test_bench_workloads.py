"""Benchmark workloads: determinism (init seed vs data-order seed), metrics, data sources, the LLaMA
blocks, and the clear errors of the data-path workloads."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distopt.bench import mnist1d_data
from distopt.bench.workloads import SMALL, make_workload
from distopt.bench.workloads_lm import RMSNorm, apply_rope, byte_tokens, rope_tables, split_tokens, stdlib_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark's runs use: on a busy 2-core machine two OpenMP threads wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", SMALL)
def test_small_workloads(name):
    wl = make_workload(name, quick=True)
    assert wl.budget == 40 and wl.metric in ("accuracy", "loss")
    m1, m2 = wl.build(0), wl.build(0)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), wl.build(1).state_dict().values()))
    b1, b2, b3 = next(wl.batches(5)), next(wl.batches(5)), next(wl.batches(6))
    assert torch.equal(b1[0], b2[0]) and not torch.equal(b1[0], b3[0])
    loss = wl.loss(m1, b1)
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    ev = wl.evaluate(m1, "val")
    if wl.metric == "accuracy":
        assert 0.0 <= ev["metric"] <= 1.0 and wl.failure_value == pytest.approx(0.1)
    else:  # an untrained LM is close to the uniform predictor
        assert ev["metric"] == ev["loss"] and abs(ev["loss"] - wl.failure_value) < 0.5
    cfg = wl.config()
    assert cfg["name"] == name and cfg["data"] and cfg["budget"] == 40
    assert wl.with_budget(120).eval_every == 3 * wl.eval_every and wl.budget == 40


def test_mnist1d_generator_matches_package():
    ours, _ = mnist1d_data.load(prefer_package=False)
    assert ours["x"].shape == (4000, 40) and ours["x_test"].shape == (1000, 40)
    assert sorted(np.bincount(ours["y"]).tolist() + np.bincount(ours["y_test"]).tolist())[0] > 50
    pytest.importorskip("mnist1d")
    theirs, source = mnist1d_data.load(prefer_package=True)
    assert source == "mnist1d package"
    for k in ("x", "y", "x_test", "y_test"):
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=1e-12)


def test_gaussian_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = np.random.default_rng(0).standard_normal(72)
    np.testing.assert_allclose(mnist1d_data._gaussian_filter(x, 2), ndimage.gaussian_filter(x, 2), atol=1e-14)


def test_corpus_is_deterministic_and_split_interleaved():
    text, info = stdlib_corpus()
    assert info["chars"] == len(text) == 600_000 and info["modules"] >= 10
    assert stdlib_corpus()[1]["sha256"] == info["sha256"]
    ids = byte_tokens("héllo")
    assert ids.tolist() == [104, 63, 63, 108, 108, 111]  # é is two non-ASCII bytes -> '?'
    parts = split_tokens(torch.arange(100 * 4096), block=4096)
    assert len(parts["val"]) == len(parts["test"]) == 5 * 4096 and len(parts["train"]) == 90 * 4096
    assert parts["val"][0] == 18 * 4096 and parts["test"][0] == 19 * 4096


def test_rope_rotates_by_relative_position():
    cos, sin = rope_tables(8, 16)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=gen), torch.randn(1, 1, 1, 8, generator=gen)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:  # x placed at position pos of a sequence
        seq = torch.zeros(1, 1, pos + 1, 8)
        seq[..., pos, :] = x
        return apply_rope(seq, cos, sin)[..., pos, :]

    assert torch.allclose(at(q, 5).norm(), q.norm())  # a rotation
    assert torch.allclose((at(q, 7) * at(k, 3)).sum(), (at(q, 4) * at(k, 0)).sum(), atol=1e-5)  # depends on m - n
    assert torch.allclose(at(q, 0), q)


def test_rmsnorm():
    norm = RMSNorm(4)
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x), expected)


def test_llama_60m_size():
    from distopt.bench.workloads_lm import LLAMA_60M, Llama

    with torch.device("meta"):
        model = Llama(32000, **LLAMA_60M)
    n = sum(p.numel() for p in model.parameters())
    assert 55e6 < n < 62e6  # LLaMA-60M: 512 hidden, 1376 intermediate, 8 layers, 32000 vocabulary


def test_data_path_workloads_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --data PATH"):
        make_workload("resnet50_imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_workload("vit_s_imagenet", data=str(tmp_path / "imagenet"))
    with pytest.raises(ValueError, match="needs --data PATH"):
        make_workload("llama_60m_wikitext")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_workload("llama_60m", data=str(tmp_path / "tokens.bin"))
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("imagenet21k")
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    with pytest.raises(ValueError, match="needs at least"):
        make_workload("llama_60m_wikitext", data=str(tmp_path / "tok.bin"))
    (np.arange(40_000, dtype=np.uint16) % 1000).tofile(tmp_path / "tok.bin")
    wl = make_workload("llama_60m_wikitext", data=str(tmp_path / "tok.bin"), quick=True)
    assert wl.vocab_size == 32000 and sum(len(v) for v in wl.tokens.values()) == 40_000
    assert min(len(v) for v in wl.tokens.values()) > wl.context


def test_cuda_scales_workloads_up_lazily():
    """``--device cuda`` configs (checked without a GPU: data and models are only built on use)."""
    cpu, gpu = make_workload("llama_char"), make_workload("llama_char", device="cuda")
    assert gpu.budget > cpu.budget and gpu.model_config["dim"] > cpu.model_config["dim"] and gpu.device == "cuda"
    assert make_workload("cnn_digits", device="cuda").model_config["width"] == 64
    assert make_workload("vit_mnist1d", device="cuda").model_config["depth"] == 4
    lm = make_workload("llama_60m", device="cuda")
    assert lm.vocab_size == 32000 and lm.context == 256 and lm.budget == 2000
