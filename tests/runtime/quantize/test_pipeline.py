"""`lmforge quantize` end to end on tiny checkpoints: the files on disk (quant-format.md, exactly), a
bit-exact checkpoint round trip, the quality report, and the errors a user can hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge.kernels.quant_pack import dequantize_weight, pack_int_weights, unpack_int_weights
from lmforge.runtime.quantize import main, report
from lmforge.runtime.quantize.config import quantization_config

METHODS = ("w8a16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "fp8")
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()  # noqa: SIM118


def test_w4a16_config_is_the_library_one():
    assert quantization_config("w4a16-gptq", 128, ["lm_head"]) == {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": "0.20.0",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "pack-quantized",
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


@pytest.mark.parametrize("method", METHODS)
def test_output_files(quantized, method):
    run = quantized[method]
    config = json.loads((run.output / "config.json").read_text())
    group = {"w8a16": -1, "w4a16-rtn": 128, "w4a16-gptq": 64, "w4a16-awq": 32, "fp8": -1}[method]
    assert config["quantization_config"] == quantization_config(method, group, ["lm_head"])
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    if method == "w8a16":
        assert (weights["strategy"], weights["group_size"], weights["num_bits"]) == ("channel", None, 8)
    if method == "fp8":
        assert config["quantization_config"]["format"] == "float-quantized"
        assert (
            config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["strategy"]
            == "token"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run.output / name).read_bytes() == (run.source / name).read_bytes()
    found, metadata = tensors(run.output)
    assert metadata == {"format": "pt"}
    hidden, inter = 128, 256
    for leaf in LINEARS:
        prefix = f"model.layers.1.{leaf}"
        in_features = inter if leaf == "mlp.down_proj" else hidden
        assert f"{prefix}.weight" not in found or method == "fp8"
        if method == "fp8":
            assert found[f"{prefix}.weight"].dtype == torch.float8_e4m3fn
            assert found[f"{prefix}.weight_scale"].shape[1] == 1
            continue
        bits = 4 if method.startswith("w4") else 8
        packed, scale, shape = (
            found[f"{prefix}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")
        )
        out_features = shape[0].item()
        assert packed.dtype == torch.int32 and packed.shape == (out_features, in_features * bits // 32)
        assert shape.dtype == torch.int64 and shape.tolist() == [out_features, in_features]
        assert scale.dtype == torch.float32 and scale.shape == (
            out_features,
            1 if group < 0 else in_features // group,
        )
        assert f"{prefix}.weight_zero_point" not in found
    assert found["model.embed_tokens.weight"].dtype == torch.float32  # embeddings stay in high precision
    assert ("lm_head.weight" in found) == (method != "w8a16")  # w8a16 runs on tied embeddings


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("method", ["w4a16-gptq", "w8a16"])
def test_checkpoint_round_trip_is_bit_exact(quantized, method):
    """Codes read back from the file re-pack to the same words, and dequantize to exactly the weights
    transformers decompresses (so every loader sees the same numbers)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    run = quantized[method]
    found, _ = tensors(run.output)
    bits = 4 if method.startswith("w4") else 8
    hf = AutoModelForCausalLM.from_pretrained(
        run.output, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for leaf in LINEARS:
        prefix = f"model.layers.0.{leaf}"
        packed, scale = found[f"{prefix}.weight_packed"], found[f"{prefix}.weight_scale"]
        shape = tuple(found[f"{prefix}.weight_shape"].tolist())
        q = unpack_int_weights(packed, bits, shape)
        assert torch.equal(pack_int_weights(q, bits), packed)
        assert torch.equal(
            hf.get_submodule(prefix).weight.detach(), dequantize_weight(packed, scale, bits, shape)
        )


@pytest.mark.parametrize("method", METHODS)
def test_quality_report(quantized, method):
    run = quantized[method]
    result = run.report
    assert result["method"] == method and result["outputPath"] == str(run.output)
    assert result["sizeBytesBefore"] == (run.source / "model.safetensors").stat().st_size
    assert result["sizeBytesAfter"] == (run.output / "model.safetensors").stat().st_size
    assert result["sizeBytesAfter"] < result["sizeBytesBefore"]
    assert 0.0 <= result["klDivergence"] < 0.5 and 0.5 <= result["top1Agreement"] <= 1.0
    assert result["evalPositions"] == 4 * 48 and result["evalSource"].endswith("(held out)")
    assert result["calibrationSamples"] == 8 and result["quantizedModules"] == 14
    assert report.result_payload(result).keys() == set(report.RESULT_KEYS)


def test_kl_orders_the_methods_on_one_model(quantized, calibration_file, tmp_path):
    """Same model, same held-out text: int8 < GPTQ int4 < RTN int4 at the same group size."""
    gptq = quantized["w4a16-gptq"]  # llama, group 64
    common = [
        "--model",
        str(gptq.source),
        "--calibration",
        str(calibration_file),
        "--samples",
        "8",
        "--seq-len",
        "64",
        "--eval-samples",
        "4",
        "--eval-seq-len",
        "48",
    ]
    kl = {}
    for method, flags in (("w4a16-rtn", ["--group-size", "64"]), ("w8a16", [])):
        assert main([*common, "--method", method, "--output", str(tmp_path / method), *flags]) == 0
        kl[method] = json.loads((tmp_path / method / "quantization_report.json").read_text())["klDivergence"]
    assert kl["w8a16"] < gptq.report["klDivergence"] < kl["w4a16-rtn"]


@pytest.mark.parametrize("method", ["w4a16-gptq", "w4a16-awq"])
def test_calibrated_methods_need_data(tmp_path, sources, capsys, method):
    source = next(iter(sources.values()))
    assert main(["--model", str(source), "--method", method, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{method} needs calibration data: pass --calibration FILE.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_ignore_list_and_fused_projections(tmp_path, sources, capsys):
    source = sources[("llama", 2)]
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                str(source),
                "--method",
                "w4a16-rtn",
                "--output",
                str(out),
                "--ignore",
                "re:.*down_proj",
                "--no-eval",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "re:.*down_proj"]
    found, _ = tensors(out)
    assert found["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.up_proj.weight_packed" in found
    assert json.loads((out / "quantization_report.json").read_text())["klDivergence"] is None

    assert (
        main(
            [
                "--model",
                str(source),
                "--method",
                "w8a16",
                "--output",
                str(tmp_path / "bad"),
                "--ignore",
                "model.layers.0.self_attn.k_proj",
            ]
        )
        == 2
    )
    assert "fused by serving engines: ignore all or none" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(source),
                "--method",
                "w4a16-rtn",
                "--output",
                str(tmp_path / "bad"),
                "--group-size",
                "96",
            ]
        )
        == 2
    )
    assert "group size 96 does not divide" in capsys.readouterr().err


def test_result_annotation_on_the_pod(monkeypatch):
    from lmforge.runtime.train import progress

    patches = []

    class FakeAnnotator:
        namespace, pod = "ns", "p"

        def patch(self, annotations):
            patches.append(annotations)

    monkeypatch.setattr(progress.PodAnnotator, "from_env", classmethod(lambda cls: FakeAnnotator()))
    result = {
        "sizeBytesBefore": 10,
        "sizeBytesAfter": 4,
        "klDivergence": 0.01,
        "top1Agreement": 0.9,
        "outputPath": "/out",
        "durationSeconds": 3.0,
        "method": "fp8",
    }
    assert report.annotate_pod(result)
    assert patches == [
        {
            "lmforge.dev/result": '{"sizeBytesBefore":10,"sizeBytesAfter":4,"klDivergence":0.01,'
            '"top1Agreement":0.9,"outputPath":"/out"}'
        }
    ]
    monkeypatch.setattr(progress.PodAnnotator, "from_env", classmethod(lambda cls: None))
    assert not report.annotate_pod(result)  # outside a pod: nothing to do
