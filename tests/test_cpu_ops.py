"""The fused CPU layer ops (model/cpu_ops.py) against the torch ops they replace."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model import cpu_ops


def reference_rms_norm(x, w, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w


@pytest.fixture
def no_kernel(monkeypatch, tmp_path, caplog):
    """The ops' C library made unbuildable (a compiler that always fails); restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_ops.load_library.cache_clear()
    caplog.set_level(logging.WARNING, logger=cpu_ops.__name__)
    yield caplog
    cpu_ops.load_library.cache_clear()


def test_the_kernel_builds_here():
    assert cpu_ops.load_library() is not None


@pytest.mark.parametrize("rows", [1, 3, 64])  # 64 x 576 crosses the size where the op goes parallel
def test_rms_norm_and_residual_add(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g) * 3
    w = torch.rand(576, generator=g) + 0.5
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    residual = torch.randn(rows, 576, generator=g)
    want_sum = residual + x
    got = cpu_ops.rms_norm(x, w, 1e-6, residual)
    assert torch.equal(residual, want_sum)  # the add happened in place, exactly
    torch.testing.assert_close(got, reference_rms_norm(want_sum, w, 1e-6), rtol=2e-6, atol=1e-6)


def test_rms_norm_reads_strided_rows():
    wide = torch.randn(5, 700)
    x = wide[:, 50:626]
    w = torch.rand(576) + 0.5
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_silu_and_mul(rows):
    gate_up = torch.randn(rows, 2 * 1536, generator=torch.Generator().manual_seed(rows)) * 4
    want = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), want, rtol=2e-6, atol=1e-6)


def reference_rotary(x, positions, cos_sin):
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rotary_in_place_on_a_view_into_qkv(tokens):
    g = torch.Generator().manual_seed(tokens)
    heads, kv_heads, d = 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    qk = qkv[:, :(heads + kv_heads) * d].view(tokens, heads + kv_heads, d)  # tokens a qkv row apart
    angles = torch.rand(512, d // 2, generator=g) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, 512, (tokens,), generator=g)
    want = reference_rotary(qk.clone(), positions, cos_sin)
    cpu_ops.apply_rotary_(qk, positions, cos_sin)
    torch.testing.assert_close(qk, want, rtol=0, atol=1e-6)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before)  # v untouched


def test_other_dtypes_take_the_torch_ops():
    x = torch.randn(4, 64).bfloat16()
    w = (torch.rand(64) + 0.5).bfloat16()
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5))
    gate_up = torch.randn(4, 128).bfloat16()
    assert torch.equal(cpu_ops.silu_and_mul(gate_up), F.silu(gate_up[:, :64]) * gate_up[:, 64:])


def test_without_a_compiler_the_torch_ops_run(no_kernel):
    x, w = torch.randn(3, 64), torch.rand(64) + 0.5
    residual = torch.randn(3, 64)
    want = reference_rms_norm(residual + x, w, 1e-5)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5, residual), want, rtol=0, atol=0)
    gate_up = torch.randn(2, 128)
    assert torch.equal(cpu_ops.silu_and_mul(gate_up), F.silu(gate_up[:, :64]) * gate_up[:, 64:])
    assert [r.levelname for r in no_kernel.records] == ["WARNING"]
    assert "torch ops run instead" in no_kernel.records[0].getMessage()


def test_silu_over_the_whole_float_range():
    # The C op's vector exp is its own polynomial: check it where exp under- and overflows too.
    x = torch.cat([torch.linspace(-120, 120, 200_001), torch.linspace(-89, -88, 4001),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
    gate_up = torch.cat([x, torch.ones_like(x)])[None, :]  # one long row: the vector loop takes all but the tail
    got, want = cpu_ops.silu_and_mul(gate_up)[0], F.silu(x)
    normal = want.isfinite() & (want.abs() > 1e-30)
    assert float(((got - want).abs() / want.abs())[normal].max()) < 1e-6
    tiny = want.isfinite() & ~normal  # where e^-g overflows float32 torch gives 0, we a few 1e-37
    assert float((got - want)[tiny].abs().max()) < 1e-36
    torch.testing.assert_close(got[~want.isfinite()], want[~want.isfinite()], rtol=0, atol=0, equal_nan=True)
