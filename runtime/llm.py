"""LLM: vLLM's offline API on top of LLMEngine (EngineArgs + engine + a generate loop)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any, cast

from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.lora.request import LoRARequest
from lmforge.runtime.outputs import RequestOutput
from lmforge.runtime.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]  # text, token ids, {"prompt": ...} or {"prompt_token_ids": ...}


class LLM:
    def __init__(
        self,
        model: str | Path,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        num_blocks: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        kv_cache_dtype: str = "auto",
        **kwargs: Any,
    ):
        args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            num_blocks=num_blocks,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache_dtype=kv_cache_dtype,
            **kwargs,
        )
        self.llm_engine = LLMEngine(args)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at interpreter exit)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order. lora_request: one adapter
        for every prompt or one per prompt (None: the base model), as vLLM's."""
        prompts = _as_prompt_list(prompts)
        loras: list[LoRARequest | None] = (
            [lora_request] * len(prompts) if lora_request is None or isinstance(lora_request, LoRARequest)
            else list(lora_request)
        )  # fmt: skip
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts")
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        # only the final outputs are returned: the engine need not build one per step (vLLM does the same)
        params_list = [dataclasses.replace(p, output_kind="final_only") for p in params_list]
        order: dict[str, int] = {}
        for prompt, p, lora in zip(prompts, params_list, loras, strict=True):
            rid = str(next(self._ids))
            order[rid] = len(order)
            if isinstance(prompt, dict):
                self.llm_engine.add_request(
                    rid,
                    prompt.get("prompt") or prompt["prompt_token_ids"],
                    p,
                    prompt_token_ids=prompt.get("prompt_token_ids"),
                    lora_request=lora,
                )
            else:
                self.llm_engine.add_request(rid, prompt, p, lora_request=lora)
        return self._run(order)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts: list[Prompt] = []
        for conv in conversations:
            text = tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: dict[str, int]) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: list[RequestOutput | None] = [None] * len(order)
        remaining = len(order)
        while remaining:
            for out in engine.step():
                if out.finished and out.request_id in order:
                    finished[order[out.request_id]] = out
                    remaining -= 1
        return finished  # type: ignore[return-value]


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [cast(list[int], items)]  # one prompt given as token ids
    return cast(list[Prompt], items)
