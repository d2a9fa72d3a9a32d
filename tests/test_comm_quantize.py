"""The INT8 wire format (parallel/quantize.py): size, error bounds, rounding, edge cases, and the
Triton kernels writing the same bytes as the torch path (Triton interpreter, in a subprocess)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from parallel.quantize import Layout, dequantize_rows, dequantize_sum, quantize_rows, row_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _heavy_tailed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # Student-t with 2 degrees of freedom (infinite variance), plus a few huge outliers.
    x = torch.randn(shape, generator=g) / torch.sqrt(torch.distributions.Chi2(2.0).sample(shape) / 2)
    idx = torch.randint(0, x.numel(), (max(1, x.numel() // 1000),), generator=g)
    x.view(-1)[idx] *= 1e3
    return x


def test_payload_size():
    assert row_bytes(256 * 1000, 256) == 256 * 1000 + 4 * 1000
    assert row_bytes(256 * 1000, 256) / (256 * 1000 * 2) <= 0.508  # vs bf16
    assert row_bytes(1, 256) == 256 + 4
    assert row_bytes(5, 2) % 4 == 0  # scales stay 4-byte aligned for any block


@pytest.mark.parametrize("block", [256, 64, 100])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_round_to_nearest_error_bound(block, kind):
    x = torch.randn(3, 5000) if kind == "normal" else _heavy_tailed((3, 5000), 1)
    payload = quantize_rows(x, block)
    assert payload.shape == (3, row_bytes(5000, block)) and payload.dtype == torch.uint8
    y = dequantize_rows(payload, 5000, block, torch.empty(3, 5000))
    nb = -(-5000 // block)
    padded = torch.nn.functional.pad(x, (0, nb * block - 5000)).view(3, nb, block)
    half_step = (padded.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(padded).reshape(3, -1)[:, :5000]
    # Bound: half a quantization step of the element's own block (plus fp32 rounding).
    assert ((y - x).abs() <= half_step * (1 + 1e-5) + 1e-30).all()


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1024, generator=g)
    x[0, 0] = 10.0  # coarse steps for the rest of the first block
    total = torch.zeros(1, 1024)
    trials = 400
    for _ in range(trials):
        total += dequantize_rows(quantize_rows(x, 256, stochastic=True, generator=g), 1024, 256,
                                 torch.empty(1, 1024))
    step = 10.0 / 127
    mean_err = (total / trials - x)[0, 1:256].abs().max().item()
    rn_err = (dequantize_rows(quantize_rows(x, 256), 1024, 256, torch.empty(1, 1024)) - x)[0, 1:256]
    # The mean of 400 SR draws sits within ~4 sigma (step/2/sqrt(400)) of x; one RN draw does not.
    assert mean_err < 4 * step / 2 / trials**0.5
    assert rn_err.abs().mean().item() > 5 * (total / trials - x)[0, 1:256].abs().mean().item()


def test_error_feedback_residual():
    x = torch.randn(2, 700)
    residual = torch.zeros(2, 700)
    y = dequantize_rows(quantize_rows(x, 64, residual=residual), 700, 64, torch.empty(2, 700))
    torch.testing.assert_close(y + residual, x, rtol=0, atol=1e-6)


def test_zeros_nan_and_empty():
    x = torch.zeros(2, 300)
    x[1, 260] = float("nan")
    y = dequantize_rows(quantize_rows(x, 256), 300, 256, torch.empty(2, 300))
    assert (y[0] == 0).all() and (y[1, :256] == 0).all()
    assert torch.isnan(y[1, 256:]).all()  # a non-finite value poisons its block, visibly
    assert quantize_rows(torch.zeros(4, 0), 256).shape == (4, 4 * 0 + 0)
    out = torch.empty(0)
    assert dequantize_sum(quantize_rows(torch.zeros(2, 0), 256), 0, 256, out) is out


def test_dequantize_sum_matches_rowwise():
    x = _heavy_tailed((4, 3000), 2)
    p = quantize_rows(x, 256)
    rows = dequantize_rows(p, 3000, 256, torch.empty(4, 3000))
    s = dequantize_sum(p, 3000, 256, torch.empty(3000))
    expect = ((rows[0] + rows[1]) + rows[2]) + rows[3]
    assert torch.equal(s, expect)


_TRITON_CHECK = textwrap.dedent("""
    import torch
    from parallel import quantize as Q, quantize_triton as QT
    torch.manual_seed(0)
    cases = [(1, 1000, 256, None), (3, 513, 64, [13, 400, 100]), (4, 7, 16, None), (2, 600, 256, [1, 0, 299, 300])]
    for rows, n, block, segments in cases:
        lay = Q.Layout(n, block, segments)
        tables = lay.tables(torch.device("cpu"))
        qb = Q._q_bytes(lay.nb, block)
        x = torch.randn(rows, n) * torch.exp(2 * torch.randn(rows, n))
        x[0, :300] = 0
        ref = Q.quantize_rows(x, block, layout=lay)
        out = torch.full_like(ref, 0xAB)
        QT.quantize_rows(x, out, tables, block, qb, False, None, 0)
        assert torch.equal(ref, out), (rows, n, block)
        d1 = Q.dequantize_rows(ref, n, block, torch.empty(rows, n), lay)
        d2 = torch.full((rows, n), float("nan"))
        QT.dequantize_rows(ref, d2, tables, block, qb)
        assert torch.equal(d1, d2)
        s1 = Q.dequantize_sum(ref, n, block, torch.empty(n), lay)
        s2 = torch.full((n,), float("nan"))
        QT.dequantize_sum(ref, s2, tables, block, qb)
        assert torch.equal(s1, s2)
        r1 = 0.01 * torch.randn(rows, n)
        r2 = r1.clone()
        p1 = Q.quantize_rows(x, block, layout=lay, residual=r1)
        p2 = torch.empty_like(p1)
        QT.quantize_rows(x, p2, tables, block, qb, False, r2, 0)
        assert torch.equal(p1, p2) and torch.equal(r1, r2)
        p3 = torch.empty_like(p1)
        QT.quantize_rows(x, p3, tables, block, qb, True, None, 7)
        d3 = Q.dequantize_rows(p3, n, block, torch.empty(rows, n), lay)
        assert ((d3 - x).norm() / x.norm()) < 0.05
    # Strided rows (a piece of each row of a reduce-scatter input, of an all-gather output).
    x = torch.randn(3, 1000)
    lay = Q.Layout(300, 16, [50, 250])
    tables, qb = lay.tables(torch.device("cpu")), Q._q_bytes(lay.nb, 16)
    ref = Q.quantize_rows(x[:, 100:400].contiguous(), 16, layout=lay)
    out = torch.empty_like(ref)
    QT.quantize_rows(x[:, 100:400], out, tables, 16, qb, False, None, 0)
    assert torch.equal(ref, out)
    d1, d2 = torch.zeros(3, 1000), torch.zeros(3, 1000)
    Q.dequantize_rows(ref, 300, 16, d1[:, 100:400], lay)
    QT.dequantize_rows(ref, d2[:, 100:400], tables, 16, qb)
    assert torch.equal(d1, d2) and (d2[:, :100] == 0).all() and (d2[:, 400:] == 0).all()
    print("same bytes")
""")


def test_segments_start_new_blocks():
    # A norm weight (1.0) next to small weights: with segments each keeps its own scale.
    x = torch.cat([torch.ones(1, 100), 0.02 * torch.randn(1, 1000)], dim=1)
    lay = Layout(1100, 256, [100, 1000])
    assert lay.nb == 1 + 4 and row_bytes(1100, 256, lay) == 5 * 256 + 5 * 4
    y = dequantize_rows(quantize_rows(x, 256, layout=lay), 1100, 256, torch.empty(1, 1100), lay)
    plain = dequantize_rows(quantize_rows(x, 256), 1100, 256, torch.empty(1, 1100))
    err_seg = (y - x)[0, 100:].abs().max().item()
    err_plain = (plain - x)[0, 100:256].abs().max().item()
    assert err_seg <= x[0, 100:].abs().max().item() / 254 * 1.0001
    assert err_plain > 10 * err_seg
    # A layout that does not add up to n falls back to whole-row blocks.
    assert Layout(50, 16, [10, 10]).segments == [50]


def test_triton_kernels_write_the_same_bytes():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "same bytes" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_torch_path():
    g = torch.Generator().manual_seed(3)
    for rows, n, segments in [(2, 1 << 20, None), (4, 300_001, [1000, 299_001]), (8, 5, None)]:
        x = torch.randn(rows, n, generator=g) * torch.exp(2 * torch.randn(rows, n, generator=g))
        lay = Layout(n, 256, segments)
        cpu = quantize_rows(x, 256, layout=lay)
        gpu = quantize_rows(x.cuda(), 256, layout=lay)
        assert torch.equal(cpu, gpu.cpu())
        d_cpu = dequantize_rows(cpu, n, 256, torch.empty(rows, n, dtype=torch.bfloat16), lay)
        d_gpu = dequantize_rows(gpu, n, 256, torch.empty(rows, n, dtype=torch.bfloat16, device="cuda"), lay)
        assert torch.equal(d_cpu, d_gpu.cpu())
        s_cpu = dequantize_sum(cpu, n, 256, torch.empty(n), lay)
        s_gpu = dequantize_sum(gpu, n, 256, torch.empty(n, device="cuda"), lay)
        assert torch.equal(s_cpu, s_gpu.cpu())
