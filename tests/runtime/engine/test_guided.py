"""Guided decoding in the engine: grammar-valid outputs, and unconstrained rows untouched by
constrained ones in the same batch."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from lmforge.kernels.reference import apply_token_bitmask
from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.guided import grammar_for
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "mode": {"enum": ["car", "train"]},
    },
    "required": ["city", "days", "mode"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    return LLMEngine(EngineArgs(model=path, device="cpu", dtype="float32", max_model_len=256, num_blocks=128))


def run(
    engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]
) -> dict[str, tuple[str, list[int]]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.outputs[0].text, out.outputs[0].token_ids)
    return finals


def test_apply_token_bitmask_masks_only_listed_rows():
    logits = torch.zeros(3, 40)
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5
    bitmask[0, 1] = 1 << 3  # token 35
    out = apply_token_bitmask(logits.clone(), bitmask, torch.tensor([1]))
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5, 35]
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize(
    "spec, check",
    [
        (
            StructuredOutputsParams(json=json.dumps(SCHEMA)),
            lambda t: jsonschema.validate(json.loads(t), SCHEMA),
        ),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (
            StructuredOutputsParams(regex=r"[a-c]{2}-\d{3}"),
            lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t) or 1 / 0,
        ),
        (
            StructuredOutputsParams(choice=("yes", "no", "maybe later")),
            lambda t: t in ("yes", "no", "maybe later") or 1 / 0,
        ),
        (
            StructuredOutputsParams(grammar='start: "x" NUM "y"\nNUM: /[0-9]{1,3}/'),
            lambda t: re.fullmatch(r"x[0-9]{1,3}y", t) or 1 / 0,
        ),
        (
            StructuredOutputsParams(grammar='root ::= "a" [0-9]+ "b"'),
            lambda t: re.fullmatch(r"a[0-9]+b", t) or 1 / 0,
        ),
    ],
    ids=["json_schema", "json_object", "regex", "choice", "lark", "gbnf"],
)
def test_random_sampling_stays_inside_the_grammar(engine, spec, check):
    params = SamplingParams(max_tokens=120, temperature=0.7, seed=0, structured_outputs=spec)
    engine.add_request("g", "Hello", params)
    while engine.has_unfinished_requests():
        (out,) = engine.step()
    assert out.outputs[0].finish_reason == "stop"  # the grammar ended it (EOS), not max_tokens
    check(out.outputs[0].text)


def test_invalid_grammar_is_refused_at_add_request(engine):
    with pytest.raises(ValueError, match="invalid json constraint"):
        engine.add_request(
            "bad",
            "Hi",
            SamplingParams(
                structured_outputs=StructuredOutputsParams(
                    json=json.dumps({"type": "object", "properties": {"a": {"type": "nonsense"}}})
                )
            ),
        )
    assert not engine.has_unfinished_requests() and not engine.runner.guided.matchers
    with pytest.raises(ValueError, match="invalid regex"):
        grammar_for(StructuredOutputsParams(regex="(unclosed"))


def test_unguided_rows_identical_with_and_without_a_guided_row(engine):
    """Greedy and seeded rows draw nothing from the batch: adding a constrained row must not change them."""
    plain = {
        "greedy": ("The quick brown fox", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)),
        "seeded": (
            "Kubernetes operators",
            SamplingParams(max_tokens=24, temperature=0.9, seed=3, ignore_eos=True),
        ),
    }
    alone = run(engine, plain)
    guided = SamplingParams(
        max_tokens=60,
        temperature=1.0,
        seed=1,
        structured_outputs=StructuredOutputsParams(json=json.dumps(SCHEMA)),
    )
    mixed = run(engine, {**plain, "guided": ("Plan a trip", guided)})
    assert mixed["greedy"] == alone["greedy"] and mixed["seeded"] == alone["seeded"]
    jsonschema.validate(json.loads(mixed["guided"][0]), SCHEMA)
    assert not engine.runner.guided.matchers  # released when the sequence finished
