"""Model flags the operator passes to `lmforge serve` are checked before the model loads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmforge.runtime.serve_args import add_serve_arguments
from lmforge.runtime.serve_startup import unsupported_model_flags


def _args(model: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["--model", str(model), *flags])


def _model(tmp_path: Path, quantization_config: dict | None) -> Path:
    config = {"architectures": ["LlamaForCausalLM"]}
    if quantization_config:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


W4 = {
    "quant_method": "compressed-tensors",
    "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}},
}


@pytest.mark.parametrize(
    ("qconfig", "flags", "problem"),
    [
        pytest.param(None, [], None, id="dense-no-flag"),
        pytest.param(W4, [], None, id="quantized-no-flag"),
        pytest.param(W4, ["--quantization", "w4a16"], None, id="w4a16-matches"),
        pytest.param(W4, ["--quantization", "w8a16"], "--quantization w8a16 but", id="w8a16-mismatch"),
        pytest.param(None, ["--quantization", "fp8"], "declares no quantization", id="dense-but-fp8"),
        pytest.param(None, ["--kv-cache-dtype", "fp8"], "not implemented", id="kv-fp8"),
        pytest.param(None, ["--kv-cache-dtype", "int8"], None, id="kv-int8"),
        pytest.param(W4, ["--quantization", "w4a16", "--kv-cache-dtype", "int8"], None, id="w4a16-kv-int8"),
    ],
)
def test_model_flags(tmp_path: Path, qconfig, flags, problem) -> None:
    result = unsupported_model_flags(_args(_model(tmp_path, qconfig), *flags))
    if problem is None:
        assert result is None
    else:
        assert problem in result


def test_kv_int8_reaches_engine_args(tmp_path: Path, monkeypatch) -> None:
    from lmforge.runtime.engine import llm_engine
    from lmforge.runtime.server import default_engine_factory

    seen = {}
    monkeypatch.setattr(llm_engine, "LLMEngine", lambda engine_args: seen.setdefault("args", engine_args))
    for flags, expected in ((["--kv-cache-dtype", "int8"], "int8"), ([], "auto")):
        seen.clear()
        default_engine_factory(_args(_model(tmp_path, None), *flags))()
        assert seen["args"].kv_cache_dtype == expected


def test_load_format_dummy_serves_a_shape_without_weights(tmp_path: Path) -> None:
    """--load-format dummy: the engine comes up from config.json + tokenizer alone and generates."""
    import shutil

    from lmforge.runtime.models.tiny import save_tiny_model
    from lmforge.runtime.sampling_params import SamplingParams
    from lmforge.runtime.server import default_engine_factory

    bare = tmp_path / "bare"
    shutil.copytree(save_tiny_model(tmp_path / "full"), bare, ignore=shutil.ignore_patterns("*.safetensors"))
    engine = default_engine_factory(
        _args(
            bare, "--load-format", "dummy", "--device", "cpu", "--num-blocks", "32", "--max-model-len", "64"
        )
    )()
    assert engine.args.load_format == "dummy"
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 3
    with pytest.raises(SystemExit):
        _args(bare, "--load-format", "pt")


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        pytest.param(
            ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], None, id="auto-with-parser"
        ),
        pytest.param(
            ["--enable-auto-tool-choice"],
            "--enable-auto-tool-choice needs --tool-call-parser",
            id="no-parser",
        ),
        pytest.param(
            ["--task", "embed", "--pooler-config", '{"pooling_type": "mean"}'], None, id="pooler-mean"
        ),
        pytest.param(
            ["--pooler-config", '{"pooling_type": "MEAN"}'],
            "applies to --task embed only",
            id="pooler-no-embed",
        ),
        pytest.param(
            ["--task", "embed", "--pooler-config", '{"pooling": "MEAN"}'],
            "unknown key(s) pooling",
            id="pooler-unknown-key",
        ),
        pytest.param(
            ["--task", "embed", "--pooler-config", '{"pooling_type": "CLS"}'],
            "pooling_type must be one of",
            id="pooler-bad-type",
        ),
    ],
)
def test_tool_and_embedding_flags(tmp_path, flags, problem):
    result = unsupported_model_flags(_args(_model(tmp_path, None), *flags))
    assert result == problem if problem is None else problem in result


def test_tool_call_parser_choices_are_the_parsers():
    from lmforge.runtime.serve_args import TOOL_CALL_PARSERS
    from lmforge.runtime.tool_parsers import TOOL_PARSERS

    assert set(TOOL_CALL_PARSERS) == set(TOOL_PARSERS)
