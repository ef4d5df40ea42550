"""`moefuse.apply_to` on tiny transformers MoE models: the patched models generate the same greedy
text and nearly the same logits as the unpatched ones, fall back in training, refuse unknown
models, and the `moefuse generate` command runs end to end."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import moefuse
from moefuse.errors import MoeInputError
from moefuse.integrations.transformers import apply_to, revert, supported_model_types

transformers = pytest.importorskip("transformers")
# backend="triton" runs compiled on a GPU, or interpreted on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"

COMMON = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                                                  **COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        decoder_sparse_step=1, head_dim=12, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=32, num_experts=5, num_experts_per_tok=2, **COMMON),
}


def _tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY[model_type]()
    config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger router weights than the init, so routing differs per token
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 0.5)
    return model


def _greedy(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_patched_model_generates_the_same(model_type, backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    model = _tiny_model(model_type).to(device)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected_logits = model(ids).logits
    new_tokens = 3 if device == "cpu" and backend == "triton" else 8  # the interpreter is slow
    expected = _greedy(model, ids, new_tokens)
    patched = apply_to(model, backend=backend)
    assert patched == 2
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(_greedy(model, ids, new_tokens), expected)
    assert revert(model) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected_logits)


def test_grad_and_training_fall_back_to_the_original_forward():
    model = _tiny_model("qwen2_moe")
    reference = copy.deepcopy(model)
    apply_to(model)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2))
    model(ids).logits.sum().backward()
    reference(ids).logits.sum().backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, msg=name)
    model.train()
    reference.train()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_unknown_model_is_refused_with_the_supported_list():
    config = transformers.LlamaConfig(intermediate_size=64, **COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(MoeInputError) as error:
        moefuse.apply_to(model)
    message = str(error.value)
    assert "llama" in message and all(name in message for name in supported_model_types())


def test_non_silu_experts_are_refused():
    config = TINY["mixtral"]()
    config.hidden_act = "gelu"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(MoeInputError, match="SiLU"):
        apply_to(model)


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def test_generate_command_fast_and_slow_agree(tmp_path, capsys):
    from moefuse.cli import main

    model = _tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    _word_tokenizer(tmp_path)
    outputs = []
    for flag in ("--fast", "--no-fast"):
        assert main(["generate", str(tmp_path), "--prompt", "w5 w17 w9", "--max-new-tokens", "6", flag]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].split()) >= 1


@pytest.fixture
def saved_models(tmp_path):
    """A tiny Mixtral and a tiny dense Llama, each saved with a word-level tokenizer."""
    folders = {}
    for name, model in (("moe", _tiny_model("mixtral")),
                        ("dense", transformers.AutoModelForCausalLM.from_config(
                            transformers.LlamaConfig(intermediate_size=64, **COMMON)))):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        _word_tokenizer(folders[name])
    return folders


def test_generate_runs_a_dense_model_unpatched_unless_fast_is_required(saved_models, capsys):
    from moefuse.cli import main

    assert main(["generate", str(saved_models["dense"]), "--prompt", "w5 w17", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "running the model unpatched: apply_to: LlamaForCausalLM" in captured.err and captured.out.strip()
    assert main(["generate", str(saved_models["dense"]), "--prompt", "w5 w17", "--fast"]) == 2
    assert "moefuse: error: apply_to: LlamaForCausalLM (model_type 'llama') has no supported sparse MoE block" \
        in capsys.readouterr().err
    assert main(["generate", str(saved_models["moe"]), "--prompt", "w5 w17", "--max-new-tokens", "3"]) == 0
    assert "unpatched" not in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing folder", "model folder {folder} does not exist or is not a folder; check the path (moefuse never "
                       "downloads models)"),
    ("no config", "{folder} has no config.json; pass a Hugging Face checkpoint folder"),
    ("no tokenizer", "{folder} has no tokenizer (none of tokenizer.json"),
    ("pickled weights", "{folder} holds only pickled PyTorch weights (pytorch_model.bin); moefuse never unpickles"),
    ("zero tokens", "generate: max_new_tokens must be a positive integer, got 0"),
    ("negative tokens", "generate: max_new_tokens must be a positive integer, got -3"),
    ("empty prompt", "generate: the prompt '' encodes to no tokens; give a non-empty prompt"),
    ("bad device", "--device 'gpu0' is not a device name; use cpu, cuda or cuda:N"),
    pytest.param("absent cuda", "--device cuda was asked for but this machine has no usable CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_generate_bad_inputs_are_clear_errors(saved_models, tmp_path, capsys, case, message):
    from moefuse.cli import main

    folder = saved_models["moe"]
    args = {"zero tokens": ["--max-new-tokens", "0"], "negative tokens": ["--max-new-tokens", "-3"],
            "bad device": ["--device", "gpu0"], "absent cuda": ["--device", "cuda"]}.get(case, [])
    prompt = "" if case == "empty prompt" else "w5 w17"
    if case == "missing folder":
        folder = tmp_path / "nowhere"
    elif case == "no config":
        (folder / "config.json").unlink()
    elif case == "no tokenizer":
        for path in folder.glob("*token*"):
            path.unlink()
    elif case == "pickled weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert main(["generate", str(folder), "--prompt", prompt, *args]) == 2
    assert f"moefuse: error: {message.format(folder=folder)}" in capsys.readouterr().err
