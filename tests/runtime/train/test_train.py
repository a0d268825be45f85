"""End-to-end training of a tiny random Llama on the CPU, in-process (world size 1): loss goes down,
crash/SIGTERM + resume reproduces the uninterrupted loss curve, a corrupt newest checkpoint is
skipped, and the output loads in transformers, peft and lmforge's own engine."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from lmforge.runtime.train import main
from lmforge.runtime.train.config import config_from_dict
from lmforge.runtime.train.loop import train

STEPS = 16


class Crash(Exception):
    """Stands in for a kill -9 between steps: no final checkpoint, no output."""


def crash_at(step: int):
    def hook(current: int, loss: float) -> None:
        if current == step:
            raise Crash

    return hook


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: no oversubscription; same numerics in every run here
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_config(helpers, tiny_model, text_dataset):
    def make(out: Path, **hyperparameters) -> dict:
        return helpers.base_config(
            tiny_model, text_dataset, out, hyperparameters={"maxSteps": STEPS, **hyperparameters}
        )

    return make


@pytest.fixture(scope="module")
def full_run(full_config, tmp_path_factory) -> Path:
    """The uninterrupted reference run: full fine-tune, 16 steps, checkpoints every 4, keep 2."""
    out = tmp_path_factory.mktemp("full")
    assert train(config_from_dict(full_config(out))) == 0
    return out


def assert_same_curve(ref: dict[int, float], got: dict[int, float], steps: range) -> None:
    for step in steps:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), f"step {step}"


def test_full_finetune_lowers_loss(full_run: Path, helpers) -> None:
    losses = helpers.read_losses(full_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert helpers.loss_drop(losses) > 1.0, losses
    assert [p.name for p in sorted((full_run / "checkpoints").iterdir())] == [
        "step-00000012",
        "step-00000016",
    ]


def test_full_output_loads_in_transformers(full_run: Path, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(full_run)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    ids = tokenizer("the cat sat on the mat. the cat sat on the mat.", return_tensors="pt").input_ids
    trained = AutoModelForCausalLM.from_pretrained(full_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert trained.dtype == base.dtype == torch.float32
    with torch.no_grad():
        assert trained(ids, labels=ids).loss < base(ids, labels=ids).loss - 1.0


def test_full_output_loads_in_lmforge_engine(full_run: Path) -> None:
    try:
        from lmforge import LLM, SamplingParams

        llm = LLM(full_run, device="cpu", max_model_len=128, num_blocks=16)
    except Exception as exc:  # the engine is optional for the trainer
        pytest.skip(f"lmforge engine unavailable: {exc}")
    (out,) = llm.generate(["the cat sat"], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out.outputs[0].token_ids) == 4


def test_crash_then_resume_matches_uninterrupted(
    full_config, full_run: Path, tmp_path: Path, helpers
) -> None:
    cfg = config_from_dict(full_config(tmp_path))
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at(6))  # killed after step 6; the newest checkpoint is step 4
    assert train(cfg) == 0
    log = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 7)) + list(range(5, STEPS + 1))  # steps 5, 6 ran twice
    assert_same_curve(helpers.read_losses(full_run), helpers.read_losses(tmp_path), range(1, STEPS + 1))


def test_corrupt_newest_checkpoint_falls_back(
    full_config, full_run: Path, tmp_path: Path, helpers, capsys: pytest.CaptureFixture
) -> None:
    cfg = config_from_dict(full_config(tmp_path))
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at(10))  # checkpoints at 4 and 8
    shard = next((tmp_path / "checkpoints" / "step-00000008" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # torn write
    capsys.readouterr()
    assert train(cfg) == 0
    printed = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in printed and "step-00000008" in printed
    assert "resumed from" in printed and "step-00000004 at step 4" in printed
    assert_same_curve(helpers.read_losses(full_run), helpers.read_losses(tmp_path), range(5, STEPS + 1))


def test_sigterm_checkpoints_and_exits_143(full_config, full_run: Path, tmp_path: Path, helpers) -> None:
    cfg = config_from_dict(full_config(tmp_path))

    def term_after_5(step: int, loss: float) -> None:
        if step == 5:
            signal.raise_signal(signal.SIGTERM)  # what the kubelet sends; the handler only sets a flag

    assert train(cfg, on_step=term_after_5) == 143
    saved = tmp_path / "checkpoints" / "step-00000006"  # the step in progress is finished, then saved
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 6
    assert helpers.read_losses(tmp_path).keys() == set(range(1, 7))
    assert not (tmp_path / "model.safetensors").exists()  # no output before the end
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    assert train(cfg) == 0
    assert_same_curve(helpers.read_losses(full_run), helpers.read_losses(tmp_path), range(1, STEPS + 1))


def test_activation_checkpointing_keeps_the_numbers(
    full_config, full_run: Path, tmp_path: Path, helpers
) -> None:
    from lmforge.runtime.train.modeling import load_model

    cfg = config_from_dict(full_config(tmp_path, gradientCheckpointing=True))
    assert load_model(cfg, torch.device("cpu")).is_activation_checkpointing
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at(3))
    assert_same_curve(helpers.read_losses(full_run), helpers.read_losses(tmp_path), range(1, 4))


# --- LoRA on chat data --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_config(helpers, tiny_model, chat_dataset):
    def make(out: Path) -> dict:
        return helpers.base_config(
            tiny_model,
            chat_dataset,
            out,
            method="lora",
            dataset={"source": str(chat_dataset), "format": "messages"},
            hyperparameters={"maxSteps": 12, "learningRate": 1e-2, "gradientAccumulationSteps": 2},
            lora={
                "r": 8,
                "alpha": 16,
                "dropout": 0.1,
                "targetModules": [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
            },
            output={"dir": str(out), "mergeAdapter": True},
        )

    return make


@pytest.fixture(scope="module")
def lora_run(lora_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    assert train(config_from_dict(lora_config(out))) == 0
    return out


def test_lora_lowers_loss_and_writes_an_adapter(lora_run: Path, helpers) -> None:
    losses = helpers.read_losses(lora_run)
    assert helpers.loss_drop(losses) > 1.0, losses
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert (lora_run / "adapter_model.safetensors").exists() and (lora_run / "tokenizer.json").exists()
    # Checkpoints hold only the adapters (+ their optimizer state), not the frozen base.
    assert not (lora_run / "model.safetensors").exists()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_adapter_and_merged_model_agree(lora_run: Path, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora_run).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-3)


def test_lora_merged_loads_in_lmforge_engine(lora_run: Path) -> None:
    try:
        from lmforge import LLM, SamplingParams

        llm = LLM(lora_run / "merged", device="cpu", max_model_len=128, num_blocks=16)
    except Exception as exc:
        pytest.skip(f"lmforge engine unavailable: {exc}")
    (out,) = llm.chat(
        [{"role": "user", "content": "say abc abc abc abc."}], SamplingParams(temperature=0.0, max_tokens=4)
    )
    assert len(out.outputs[0].token_ids) >= 1


def test_lora_adapter_served_unmerged_equals_the_merged_model(lora_run: Path, tiny_model: Path) -> None:
    """The TrainJob's adapter directory, served as-is on the base (--enable-lora), gives the merged model's
    greedy tokens and logprobs: what an InferenceService picks up from a finished LoRA TrainJob."""
    from lmforge import LLM, LoRARequest, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
    prompts = [[0, 5, 17, 42, 99, 7], list(range(3, 40))]
    served = LLM(tiny_model, device="cpu", dtype="float32", max_model_len=128, num_blocks=16, enable_lora=True,
                 max_lora_rank=8, lora_modules={"ft": str(lora_run)})  # fmt: skip
    merged = LLM(lora_run / "merged", device="cpu", dtype="float32", max_model_len=128, num_blocks=16)
    ours = served.generate(prompts, params, lora_request=LoRARequest("ft"))
    base = served.generate(prompts, params)
    for got, want, plain in zip(ours, merged.generate(prompts, params), base, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4
        assert plain.outputs[0].logprobs != got.outputs[0].logprobs  # the adapter changed something


def test_lora_resume_with_dropout_and_accumulation(
    lora_config, lora_run: Path, tmp_path: Path, helpers
) -> None:
    cfg = config_from_dict(lora_config(tmp_path))
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at(10))  # resumes from step 8
    assert train(cfg) == 0
    assert_same_curve(helpers.read_losses(lora_run), helpers.read_losses(tmp_path), range(1, 13))


# --- the command line ------------------------------------------------------------------------------


def test_main_reports_bad_rows(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    code = main(["--model", str(tiny_model), "--dataset", str(data), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"dataset error: {data}:2: expected a non-empty string field" in capsys.readouterr().err


def test_main_reports_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "train.json"
    path.write_text(
        json.dumps(
            {"model": "/m", "dataset": "/d", "output": {"dir": "/o"}, "hyperparameters": {"lerningRate": 1}}
        )
    )
    assert main(["--config", str(path)]) == 2
    assert "config error: hyperparameters.lerningRate: unknown key" in capsys.readouterr().err
