"""One handler class per scheme (gpt-fast style). Each turns the target Linears of an HF model into
checkpoint tensors and leaves the model computing with the dequantized weights (so the quality report
and the next layer's calibration see exactly what a loader will):

    scheme = make_scheme(options, dtype)
    packed = scheme.quantize_model(model, targets, calibration_ids, device)  # {module name: tensors}

Tensors per Linear (quant-format.md): int schemes `weight_packed` int32 [out, in*bits/32],
`weight_scale` [out, groups], `weight_shape` int64 [2]; fp8 `weight` float8_e4m3fn [out, in],
`weight_scale` [out, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.kernels.quant_pack import pack_int_weights
from lmforge.runtime.quantize import awq, awq_pairs, calibration, gptq, rtn
from lmforge.runtime.quantize.config import QuantizeOptions

Tensors = dict[str, torch.Tensor]
Log = Callable[[str], None]


class Scheme:
    """Round-to-nearest symmetric int, no calibration (W8A16 per channel, W4A16 RTN)."""

    method = ""
    needs_calibration = False

    def __init__(self, bits: int, group_size: int, dtype: torch.dtype, log: Log = print):
        self.bits, self.group_size, self.dtype, self.log = bits, group_size, dtype, log

    # --- one weight ---------------------------------------------------------------------------------
    def int_tensors(self, q: torch.Tensor, scale: torch.Tensor) -> Tensors:
        return {
            "weight_packed": pack_int_weights(q.cpu(), self.bits),
            "weight_scale": scale.cpu().contiguous(),
            "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
        }

    @torch.no_grad()
    def finish(self, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> Tensors:
        """Packs (q, scale) and makes `linear` compute with q * scale (in the scale dtype)."""
        linear.weight.copy_(rtn.dequantize_int(q, scale).to(linear.weight.dtype))
        return self.int_tensors(q, scale)

    def quantize_linear(self, linear: nn.Linear) -> Tensors:
        q, scale = rtn.rtn_int(linear.weight.detach(), self.bits, self.group_size, self.dtype)
        return self.finish(linear, q, scale)

    # --- the model ----------------------------------------------------------------------------------
    def quantize_model(
        self,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        samples: list[torch.Tensor],
        device: torch.device,
    ) -> dict[str, Tensors]:
        return {name: self.quantize_linear(linear) for name, linear in targets.items()}


class W8A16(Scheme):
    method = "w8a16"


class W4A16RTN(Scheme):
    method = "w4a16-rtn"


class FP8(Scheme):
    """float8 e4m3 weights per output channel; activations quantized per token at run time (dynamic),
    which `install_activation_quant` reproduces for the quality report."""

    method = "fp8"

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear) -> Tensors:
        w8, scale = rtn.quantize_fp8(linear.weight.detach(), self.dtype)
        linear.weight.copy_(rtn.dequantize_fp8(w8, scale).to(linear.weight.dtype))
        return {"weight": w8.cpu().contiguous(), "weight_scale": scale.cpu().contiguous()}

    @staticmethod
    def install_activation_quant(targets: dict[str, nn.Linear]) -> list[torch.utils.hooks.RemovableHandle]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (rtn.fake_quant_fp8_tokens(args[0]), *args[1:])

        return [linear.register_forward_pre_hook(hook) for linear in targets.values()]


class LayerwiseScheme(Scheme):
    """Calibrated schemes: decoder layers one at a time on the outputs of the quantized layers before
    (calibration.py); Linears outside the decoder layers fall back to RTN."""

    needs_calibration = True

    def quantize_model(self, model, targets, samples, device):
        layers_name, layers = calibration.decoder_layers(model)
        out: dict[str, Tensors] = {}
        inputs = calibration.capture_layer_inputs(model, layers[0], samples, device)
        for index, layer in enumerate(layers):
            prefix = f"{layers_name}.{index}."
            local = {
                name[len(prefix) :]: linear for name, linear in targets.items() if name.startswith(prefix)
            }
            for local_name, tensors in self.quantize_layer(layer, local, inputs).items():
                out[prefix + local_name] = tensors
            if index + 1 < len(layers):
                inputs = calibration.run_layer(layer, inputs)
            self.log(f"[lmforge.quantize] {self.method}: layer {index + 1}/{len(layers)} done")
        for name, linear in targets.items():  # outside the decoder layers
            if name not in out:
                out[name] = super().quantize_linear(linear)
        return out

    def quantize_layer(
        self, layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[calibration.LayerInput]
    ) -> dict[str, Tensors]:
        raise NotImplementedError


def _observe(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list[calibration.LayerInput],
    sink: dict[str, Callable[[torch.Tensor], None]],
) -> None:
    """Runs the layer over `inputs`, feeding each Linear's input activations to sink[name]."""
    handles = [
        linears[name].register_forward_hook(lambda m, args, out, fn=fn: fn(args[0]))
        for name, fn in sink.items()
    ]
    try:
        calibration.run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()


class W4A16GPTQ(LayerwiseScheme):
    method = "w4a16-gptq"

    def __init__(
        self,
        bits: int,
        group_size: int,
        dtype: torch.dtype,
        log: Log = print,
        *,
        damp: float = 0.01,
        act_order: bool = True,
    ):
        super().__init__(bits, group_size, dtype, log)
        self.damp, self.act_order = damp, act_order

    def quantize_layer(self, layer, linears, inputs):
        hessians = {
            name: gptq.HessianAccumulator(linear.in_features, linear.weight.device)
            for name, linear in linears.items()
        }
        _observe(layer, linears, inputs, {name: acc.add for name, acc in hessians.items()})
        out = {}
        for name, linear in linears.items():
            q, scale = gptq.gptq_quantize(
                linear.weight.detach(),
                hessians[name].hessian,
                self.bits,
                self.group_size,
                self.dtype,
                damp=self.damp,
                act_order=self.act_order,
            )
            out[name] = self.finish(linear, q, scale)
        return out


class W4A16AWQ(LayerwiseScheme):
    method = "w4a16-awq"

    def __init__(self, bits: int, group_size: int, dtype: torch.dtype, log: Log = print, *, seed: int = 0):
        super().__init__(bits, group_size, dtype, log)
        self.seed = seed

    def quantize_model(self, model, targets, samples, device):
        config = model.config
        self.pairs = awq_pairs.pairs_for(config.to_dict())  # refuses a family without a table
        self.num_heads = int(getattr(config, "num_attention_heads", 0) or 0)
        return super().quantize_model(model, targets, samples, device)

    def quantize_layer(self, layer, linears, inputs):
        groups = awq.layer_groups(layer, set(linears), self.pairs, self.num_heads)
        stats = {
            name: awq.ActivationStats(linear.in_features, max_rows=2048, seed=self.seed)
            for name, linear in linears.items()
        }
        _observe(layer, linears, inputs, {name: s.add for name, s in stats.items()})
        modules = dict(layer.named_modules())
        inputs_of = {name: s.sample() for name, s in stats.items()}  # [rows, in] fp32, CPU
        searches = []
        for pair, _ in groups:
            first = stats[pair.consumers[0]]
            weights = [linears[name].weight.detach() for name in pair.consumers]
            searches.append(
                awq.search_scales(
                    weights,
                    inputs_of[pair.consumers[0]],
                    first.mean_abs,
                    self.bits,
                    self.group_size,
                    self.dtype,
                )
            )
        for (pair, rows), search in zip(groups, searches, strict=True):
            awq.fold_scales(
                modules[pair.previous], [linears[name] for name in pair.consumers], search.scales, rows
            )
            for name in pair.consumers:  # their input is now x / s
                inputs_of[name] = inputs_of[name] / search.scales.cpu()
        out = {}
        for name, linear in linears.items():
            w = linear.weight.detach()
            if name.rpartition(".")[2] in awq.NO_CLIP:
                q, scale = rtn.rtn_int(w, self.bits, self.group_size, self.dtype)
            else:
                q, scale = awq.quantize_with_clipping(
                    w, inputs_of[name].to(w.device), self.bits, self.group_size, self.dtype
                )
            out[name] = self.finish(linear, q, scale)
        return out


def make_scheme(options: QuantizeOptions, dtype: torch.dtype, log: Log = print) -> Scheme:
    group = options.effective_group_size
    if options.method == "w8a16":
        return W8A16(8, group, dtype, log)
    if options.method == "w4a16-rtn":
        return W4A16RTN(4, group, dtype, log)
    if options.method == "w4a16-gptq":
        return W4A16GPTQ(4, group, dtype, log, damp=options.damp, act_order=options.act_order)
    if options.method == "w4a16-awq":
        return W4A16AWQ(4, group, dtype, log, seed=options.seed)
    return FP8(8, -1, dtype, log)
