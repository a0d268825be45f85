"""runtime/models/quant.py: quantization_config parsing, the Linear swap, and shard-aware loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.kernels.quant_pack import dequantize_weight, pack_int_weights
from lmforge.runtime.models.layers import MergedLinear, QKVLinear
from lmforge.runtime.models.quant import Fp8Linear, QuantLinear, WeightScheme, apply_quantization, scheme_for

W4 = {
    "targets": ["Linear"],
    "format": "pack-quantized",
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
}
FP8 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
}


def config(group: dict, ignore: list[str], fmt: str = "pack-quantized") -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
    }


class Tiny(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self):
        super().__init__()
        self.qkv_proj = QKVLinear(64, 4, 2, 16, bias=True)  # q 64, k 32, v 32 rows
        self.gate_up_proj = MergedLinear(64, [96, 96])
        self.down_proj = nn.Linear(96, 64, bias=False)
        self.lm_head = nn.Linear(64, 10, bias=False)


def write_config(tmp_path, qc: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))


def test_scheme_parsing():
    assert WeightScheme.from_group(W4, "pack-quantized") == WeightScheme(4, "int", 32, "pack-quantized")
    assert WeightScheme.from_group(FP8, "float-quantized") == WeightScheme(
        8, "float", -1, "float-quantized", True
    )
    with pytest.raises(ValueError, match="asymmetric"):
        WeightScheme.from_group({**W4, "weights": {**W4["weights"], "symmetric": False}}, "pack-quantized")
    with pytest.raises(ValueError, match="format 'int-quantized' is not supported"):
        WeightScheme.from_group({**W4, "format": "int-quantized"}, "pack-quantized")
    qc = config(W4, ["lm_head", "re:.*down_proj"])
    assert scheme_for("layers.0.mlp.down_proj", nn.Linear(2, 2), qc) is None
    assert scheme_for("lm_head", nn.Linear(2, 2), qc) is None
    assert scheme_for("layers.0.mlp.up_proj", nn.Linear(2, 2), qc).bits == 4


def test_dense_checkpoint_is_untouched(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    model = Tiny()
    assert apply_quantization(model, tmp_path) is None and type(model.qkv_proj) is QKVLinear


def test_swap_and_shard_loading(tmp_path):
    write_config(tmp_path, config(W4, ["lm_head", "down_proj"]))
    model = Tiny()
    apply_quantization(model, tmp_path)
    assert isinstance(model.qkv_proj, QuantLinear) and isinstance(model.gate_up_proj, QuantLinear)
    assert type(model.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear  # ignored
    qkv = model.qkv_proj
    assert qkv.weight_packed.shape == (128, 8) and qkv.weight_scale.shape == (128, 2)

    g = torch.Generator().manual_seed(0)
    shards = {"q": 64, "k": 32, "v": 32}
    q_codes = {s: torch.randint(-8, 8, (n, 64), generator=g) for s, n in shards.items()}
    scales = {s: torch.rand(n, 2, generator=g) + 0.1 for s, n in shards.items()}
    biases = {s: torch.randn(n, generator=g) for s, n in shards.items()}
    params = dict(qkv.named_parameters())
    for s, n in shards.items():
        qkv.weight_loader(params["weight_packed"], pack_int_weights(q_codes[s], 4), s)
        qkv.weight_loader(params["weight_scale"], scales[s], s)
        qkv.weight_loader(params["weight_shape"], torch.tensor([n, 64]), s)
        qkv.weight_loader(params["bias"], biases[s], s)
    with pytest.raises(ValueError, match="does not match the model"):
        qkv.weight_loader(params["weight_shape"], torch.tensor([64, 32]), "k")
    weight = torch.cat(
        [dequantize_weight(pack_int_weights(q_codes[s], 4), scales[s], 4, (n, 64)) for s, n in shards.items()]
    )
    x = torch.randn(5, 64, generator=g)
    assert torch.allclose(qkv(x), x @ weight.t() + torch.cat(list(biases.values())), atol=1e-5)


def test_fp8_swap_and_forward(tmp_path):
    write_config(tmp_path, config(FP8, ["lm_head"], "float-quantized"))
    model = Tiny()
    apply_quantization(model, tmp_path)
    down = model.down_proj
    assert isinstance(down, Fp8Linear) and down.fp8_activations and down.weight.dtype == torch.float8_e4m3fn
    w = torch.randn(64, 96)
    scale = w.abs().amax(-1, keepdim=True) / 448
    down.weight.data.copy_((w / scale).to(torch.float8_e4m3fn))
    down.weight_scale.data.copy_(scale)
    x = torch.randn(3, 96)
    exact = x @ w.t()
    assert float((down(x) - exact).norm() / exact.norm()) < 0.05  # e4m3 weights and activations: ~2^-4 each


def test_mixed_fused_shards_and_quantized_lm_head_are_refused(tmp_path):
    write_config(tmp_path, config(W4, ["lm_head", "k_proj"]))
    with pytest.raises(ValueError, match="fused into qkv_proj but quantized differently"):
        apply_quantization(Tiny(), tmp_path)
    write_config(tmp_path, config({**W4, "targets": ["re:.*down_proj", "lm_head"]}, []))
    with pytest.raises(ValueError, match="quantized lm_head is not supported"):
        apply_quantization(Tiny(), tmp_path)
