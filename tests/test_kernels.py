"""The sparse paths equal the dense computation: selections, values and every gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from vitscope.saes.architectures import build_sae
from vitscope.saes.architectures.topk import TopKOptions
from vitscope.saes.aux import AUX_RECON, choose_aux
from vitscope.saes.card import SAECard
from vitscope.saes.kernels import (
    GATHER_DOT,
    SCATTER_OUTER,
    Kernels,
    Rows,
    dense_preacts,
    gather_dot,
    gather_sum,
    scatter_outer,
    top_per_row,
    topk_by_group_maxima,
    topk_preacts,
)
from vitscope.saes.sae import losses


def random_problem(n_tokens: int, d: int, n_latents: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=generator) * 3 + 1
    w = torch.randn(n_latents, d, generator=generator) / d**0.5
    b = torch.randn(n_latents, generator=generator) * 0.1
    return x, w, b


@pytest.mark.parametrize("n_latents", [1024, 1000])
def test_topk_preacts_select_as_the_dense_product(n_latents: int):
    """float32: the dense selection. bfloat16: exact float32 values at its choices, which differ
    from the exact top k only by near-ties (a few latents in a thousand here)."""
    for seed in range(3):
        x, w, b = random_problem(300, 64, n_latents, seed)
        dense_BF = dense_preacts(x, w, b)
        dense_values, dense_idx = dense_BF.topk(8, dim=1)
        dense_idx, order = dense_idx.sort(dim=1)
        values, idx = topk_preacts(x, w, b, k=8, precision="float32")
        assert torch.equal(idx, dense_idx)
        torch.testing.assert_close(values, dense_values.gather(1, order), rtol=1e-5, atol=1e-5)
        values, idx = topk_preacts(x, w, b, k=8, precision="bfloat16")
        torch.testing.assert_close(values, dense_BF.gather(1, idx), rtol=1e-5, atol=1e-5)
        agree = (idx[:, :, None] == dense_idx[:, None, :]).any(dim=2).float().mean()
        assert agree > 0.97


@pytest.mark.parametrize(("m", "group"), [(4, 32), (16, 8), (64, 16), (8, 64)])
def test_topk_by_group_maxima_is_each_rows_top_m(m: int, group: int):
    """The same values as topk's, at distinct columns holding them: rows of any offset, rows of
    few distinct values (ties at the cut), a constant row (every value passes the cut)."""
    generator = torch.Generator().manual_seed(m)
    values_BF = torch.randn(60, 1024, generator=generator) + torch.randn(60, 1, generator=generator)
    values_BF[:20] = values_BF[:20].round()
    values_BF[20] = 3.0
    top, columns = topk_by_group_maxima(values_BF, m, group)
    expected = values_BF.topk(m, dim=1).values
    assert torch.equal(top.sort(dim=1, descending=True).values, expected)
    assert torch.equal(values_BF.gather(1, columns), top)
    assert (columns.sort(dim=1).values.diff(dim=1) > 0).all()
    top, columns = top_per_row(values_BF, m)
    assert torch.equal(top.sort(dim=1, descending=True).values, expected)
    assert torch.equal(values_BF.gather(1, columns), top)


EVERY_KERNEL = [
    Kernels(*combo) for combo in itertools.product(GATHER_DOT, SCATTER_OUTER, AUX_RECON)
]
"""Every implementation of each product, the CUDA ones included: all run on the CPU."""


@pytest.mark.parametrize("kernels", EVERY_KERNEL, ids=str)
def test_sparse_primitives_equal_their_dense_formulas(kernels: Kernels):
    x, w, _ = random_problem(50, 16, 40, 0)
    kept = torch.rand(50, 40) < torch.rand(50, 1) * 0.3  # a varying number per token, some none
    kept[0] = False
    values_BF = torch.randn(50, 40) * kept
    rows = Rows.from_flat(kept.view(-1).nonzero().squeeze(1), 50, 40)
    values = values_BF[kept]
    torch.testing.assert_close(gather_sum(rows, values, w), values_BF @ w)
    torch.testing.assert_close(
        scatter_outer(rows, values, x, 40, kernels.scatter_outer), values_BF.T @ x
    )
    torch.testing.assert_close(gather_dot(rows, x, w, kernels.gather_dot), (x @ w.T)[kept])


def test_rows_split_by_latent_sum_to_each_band():
    """Bag b·3 + i holds token b's latents in band i of [0, 10), [10, 25), [25, 40): its sum is
    the band's slice of the dense product, empty bands and tokens included."""
    _, w, _ = random_problem(1, 16, 40, 0)
    kept = torch.rand(50, 40) < torch.rand(50, 1) * 0.3
    kept[0], kept[1, :25] = False, False
    values_BF = torch.randn(50, 40) * kept
    rows = Rows.from_flat(kept.view(-1).nonzero().squeeze(1), 50, 40)
    bands = rows.split_by_latent((10, 25))
    assert bands.n_tokens == 150 and torch.equal(bands.idx, rows.idx)
    sums = gather_sum(bands, values_BF[kept], w).view(50, 3, 16)
    for i, (low, high) in enumerate([(0, 10), (10, 25), (25, 40)]):
        torch.testing.assert_close(sums[:, i], values_BF[:, low:high] @ w[low:high])


def test_aux_route_follows_the_dead_count_against_k_aux():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_aux(64, 16, cpu) == "dense_dead" and choose_aux(100_000, 16, cpu) == "sparse"
    assert choose_aux(16 * 128, 16, cuda) == "dense_dead"
    assert choose_aux(16 * 128 + 1, 16, cuda) == "sparse"


@pytest.mark.parametrize("kernels", EVERY_KERNEL, ids=str)
@pytest.mark.parametrize("n_latents", [512, 500])
def test_sparse_sae_has_the_dense_loss_and_gradients(n_latents: int, kernels: Kernels):
    x, _, _ = random_problem(128, 32, 1, 1)
    grads = {}
    outputs = {}
    for dense in (True, False):
        sae = build_sae(SAECard(32, n_latents, TopKOptions(k=8)), seed=3)
        sae.kernels = kernels
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
            sae.b_pre.fill_(0.5)
        dead = torch.zeros(n_latents, dtype=torch.bool)
        dead[::3] = True
        out = sae.autoencode(x, dead_F=dead, k_aux=16, dense=dense)
        terms = losses(sae, out, x)
        terms["loss"].backward()
        outputs[dense] = (out, terms)
        grads[dense] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    (dense_out, dense_terms), (sparse_out, sparse_terms) = outputs[True], outputs[False]
    assert torch.equal(dense_out.rows.idx, sparse_out.rows.idx)
    torch.testing.assert_close(sparse_out.recon_BD, dense_out.recon_BD, rtol=1e-5, atol=1e-5)
    for name in ("mse", "aux", "loss"):
        torch.testing.assert_close(sparse_terms[name], dense_terms[name], rtol=1e-5, atol=1e-6)
        assert sparse_terms[name] > 0
    for name, grad in grads[True].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[False][name], grad, rtol=1e-4, atol=1e-6)
