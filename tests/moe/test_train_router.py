"""Router fine-tuning: only the routers change, and the training objective goes down."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
import transformers

from moefuse import build_moe
from moefuse.errors import MoefuseError
from moefuse.moe.train_router import train_router
from tests.moe.tiny_models import WORDS, save_dense_models, word_tokenizer


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    dense = save_dense_models(root, "llama", count=3, noise=0.2)
    build_moe({"base_model": str(dense[0]), "gate_mode": "random", "experts_per_token": 2,
               "experts": [{"source_model": str(f)} for f in dense]}, root / "moe", progress=False)
    rng = random.Random(0)
    text = root / "train.txt"
    text.write_text(" ".join(" ".join(WORDS[i:i + 4]) for i in (rng.randrange(40) for _ in range(600))))
    return root / "moe", text


def _losses(folder, text, seq_len=32):
    """(total loss, load-balancing loss) on fixed windows of the training text."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = word_tokenizer()(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids
    windows = ids[0, : (ids.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)[:16]
    with torch.no_grad():
        output = model(input_ids=windows, labels=windows, output_router_logits=True)
    return output.loss.item(), output.aux_loss.item()


def test_gate_training_changes_only_the_routers_and_balances_them(moe, tmp_path):
    folder, text = moe
    result = train_router(folder, text, tmp_path / "trained", steps=20, seq_len=32, batch_size=8,
                          learning_rate=3e-2, aux_loss_coef=1.0, progress=False)
    assert len(result.losses) == 20 and len(result.balance_losses) == 20
    assert result.trained_parameters == 2 * 3 * 64
    before = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained").state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    assert _losses(tmp_path / "trained", text)[1] < _losses(folder, text)[1]
    assert (tmp_path / "trained" / "tokenizer.json").exists()


def test_training_all_parameters_lowers_the_language_model_loss(moe, tmp_path):
    folder, text = moe
    train_router(folder, text, tmp_path / "trained", steps=15, seq_len=32, batch_size=8, learning_rate=3e-3,
                 train="all", progress=False)
    assert _losses(tmp_path / "trained", text)[0] < _losses(folder, text)[0] - 0.5


def test_training_errors(moe, tmp_path):
    folder, text = moe
    with pytest.raises(MoefuseError, match="does not exist"):
        train_router(folder, tmp_path / "missing.txt", tmp_path / "out", steps=1, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("the king")
    with pytest.raises(MoefuseError, match="fewer than one window"):
        train_router(folder, short, tmp_path / "out", steps=1, progress=False)
    with pytest.raises(MoefuseError, match="train='everything'"):
        train_router(folder, text, tmp_path / "out", steps=1, train="everything", seq_len=16, progress=False)
    dense = save_dense_models(tmp_path, "llama", count=1)[0]
    with pytest.raises(MoefuseError, match="not a token-routed MoE"):
        train_router(dense, text, tmp_path / "out", steps=1, seq_len=16, progress=False)
    with pytest.raises(MoefuseError, match="--device 'gpu' is not a device name"):
        train_router(folder, text, tmp_path / "out", steps=1, seq_len=16, device="gpu", progress=False)
    assert not (tmp_path / "out").exists()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(MoefuseError, match=f"output folder {folder} is the input {folder}; writing it would replace"):
        train_router(folder, text, folder, steps=1, seq_len=16, overwrite=True, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_cli(moe, tmp_path, capsys):
    from moefuse.cli import main

    folder, text = moe
    assert main(["train-router", str(folder), str(text), str(tmp_path / "out"), "--steps", "2", "--seq-len", "16"]) == 0
    assert "parameters trained" in capsys.readouterr().out
    assert main(["train-router", str(folder), str(tmp_path / "none.txt"), str(tmp_path / "x"), "--quiet"]) == 2


def test_a_bf16_checkpoint_is_saved_in_bf16_with_its_own_aux_loss_coef(moe, tmp_path):
    from safetensors import safe_open

    folder, text = moe
    half = tmp_path / "bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.config.router_aux_loss_coef = 0.001
    model.to(torch.bfloat16).save_pretrained(half)
    word_tokenizer().save_pretrained(half)
    train_router(half, text, tmp_path / "trained", steps=1, seq_len=16, aux_loss_coef=0.5, progress=False)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "trained")
    assert config.dtype == torch.bfloat16 and config.router_aux_loss_coef == 0.001
    with safe_open(tmp_path / "trained" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}


@pytest.mark.parametrize("case, message", [
    ("missing model", "model folder {model} does not exist or is not a folder"),
    ("no tokenizer", "{model} has no tokenizer (none of tokenizer.json"),
    ("pickled weights", "{model} holds only pickled PyTorch weights"),
    ("latin-1 text", "training text {text} is not UTF-8 text (byte 9 is 0xe9); convert it"),
    ("text is a folder", "training text {text} is a folder; pass a local UTF-8 text file"),
    ("negative aux coef", "--aux-loss-coef (aux_loss_coef) must be >= 0, got -1.0"),
])
def test_bad_training_inputs_name_the_file(moe, tmp_path, case, message):
    folder, text = moe
    model = tmp_path / "model"
    if case != "missing model":
        shutil.copytree(folder, model)
    if case == "no tokenizer":
        for path in model.glob("*token*"):
            path.unlink()
    elif case == "pickled weights":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif case == "latin-1 text":
        text = tmp_path / "latin1.txt"
        text.write_bytes("w1 w2 caf\xe9 w3".encode("latin-1"))
    elif case == "text is a folder":
        text = tmp_path
    with pytest.raises(MoefuseError) as raised:
        train_router(model, text, tmp_path / "out", steps=1, seq_len=16, progress=False,
                     aux_loss_coef=-1.0 if case == "negative aux coef" else 0.02)
    assert message.format(model=model, text=text) in str(raised.value)
    assert not (tmp_path / "out").exists()
