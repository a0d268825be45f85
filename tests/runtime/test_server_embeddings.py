"""POST /v1/embeddings through a real `lmforge serve --task embed` and the official openai client."""

from __future__ import annotations

import math

import openai
import pytest
import torch

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)


@pytest.fixture(scope="module")
def embed_server(tiny_model_dir, tmp_path_factory, launch_server):
    proc = launch_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("embed"),
        "--num-blocks",
        "64",
        "--task",
        "embed",
        "--max-num-batched-tokens",
        "16",
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_embeddings_shape_norm_determinism_and_hf_parity(embed_server, tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    client = embed_server.openai()
    texts = ["The quick brown fox", "Hello world! How are you today?", "Paris"]
    batch = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == "tiny"
    vectors = [d.embedding for d in batch.data]
    assert all(len(v) == 64 for v in vectors)  # the tiny model's hidden size
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-5) for v in vectors)
    again = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    torch.testing.assert_close(
        torch.tensor([d.embedding for d in again.data]), torch.tensor(vectors), atol=1e-6, rtol=0
    )  # float == base64 (float32), repeatable
    single = client.embeddings.create(model="tiny", input=texts[1])
    assert single.data[0].embedding == pytest.approx(vectors[1], abs=1e-5)  # batched == alone
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert batch.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    model = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        last = model(torch.tensor([tok.encode(texts[1])])).last_hidden_state[0, -1]
    assert vectors[1] == pytest.approx(torch.nn.functional.normalize(last, dim=-1).tolist(), abs=1e-5)
    assert embed_server.metric("vllm:kv_cache_usage_perc") == 0.0  # no KV kept


def test_embedding_refusals(embed_server, server):
    client = embed_server.openai()
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=8)
    response = embed_server.post("/v1/embeddings", json={"input": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = embed_server.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 400 and "--task embed" in response.json()["error"]["message"]
    response = server.post("/v1/embeddings", json={"input": "x"})  # a generating server
    assert response.status_code == 400 and "--task embed" in response.json()["error"]["message"]
    assert embed_server.openai().models.retrieve("tiny").model_extra["task"] == "embed"
