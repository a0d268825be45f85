import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch

from lmforge.kernels import backend
from lmforge.kernels.backend import Ops, get_ops, resolve_backend

KERNELS_DIR = pathlib.Path(backend.__file__).parent
OP_NAMES = [f.name for f in dataclasses.fields(Ops) if f.name != "name"]


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert get_ops("cpu").name == "torch"
    assert resolve_backend("cuda") == "triton"


def test_env_and_argument_choose(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert resolve_backend("cuda") == "torch"
    assert resolve_backend("cuda", "triton") == "triton"
    monkeypatch.setenv(backend.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("cpu", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("cpu", "triton") == "triton"


def test_both_backends_expose_the_same_signatures(device):
    torch_ops, triton_ops = get_ops(device, "torch"), get_ops(device, "triton")
    assert triton_ops.name == "triton"
    for name in OP_NAMES:
        a, b = getattr(torch_ops, name), getattr(triton_ops, name)
        assert a is not b, name
        assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters), name


def test_backends_agree_on_a_decoder_layer_step(device):
    """A small prefill + decode through every attention-side op, torch vs triton."""
    results = {}
    for name in ("torch", "triton"):
        ops = get_ops(device, name)
        torch.manual_seed(1)
        t, hq, hkv, d, bs = 6, 4, 2, 16, 4
        k_cache = torch.zeros(4, bs, hkv, d, device=device)
        v_cache = torch.zeros_like(k_cache)
        cos_sin = torch.randn(16, d, device=device)
        x = torch.randn(t, 32, device=device)
        h, residual = ops.fused_add_rms_norm(x, torch.randn_like(x), torch.ones(32, device=device), 1e-6)
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
        ops.rope(torch.arange(t, device=device), q, k, cos_sin)
        ops.reshape_and_cache(k, v, k_cache, v_cache, torch.tensor([4, 5, 6, 7, 8, 9], device=device))
        bt = torch.tensor([[1, 2, 0]], dtype=torch.int32, device=device)
        sl = torch.tensor([t], dtype=torch.int32, device=device)
        cu = torch.tensor([0, t], dtype=torch.int32, device=device)
        prefill = ops.paged_prefill_attention(q, k_cache, v_cache, bt, sl, cu, t, 0.25)
        decode = ops.paged_decode_attention(q[-1:].contiguous(), k_cache, v_cache, bt, sl, 0.25)
        results[name] = (h, residual, ops.silu_and_mul(qkv), prefill, decode)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["triton"][3][-1], results["triton"][4][0], atol=1e-5, rtol=1e-5)


TORCH_ONLY = ["backend", "reference", "rope_cache", "quant_pack", "_interp", "alibi"]


@pytest.mark.parametrize("module", TORCH_ONLY)
def test_torch_side_modules_do_not_import_triton_at_load(module):
    """The CPU path never needs triton: module-level imports stay within torch and these modules."""
    tree = ast.parse((KERNELS_DIR / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else [n for n in [node.module] if n]
            if node.level and node.module:
                assert node.module in TORCH_ONLY, f"{module}.py imports .{node.module} at load time"
        else:
            continue
        assert not any(n.split(".")[0] == "triton" for n in names), f"{module}.py imports triton at load time"
