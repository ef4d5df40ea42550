"""Merging models whose vocabularies differ (tokenizer_source / tokenizer), against mergekit, and
the chat_template option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from moefuse import MergeConfigError, MergeInputError
from moefuse.merge import merge_checkpoints
from moefuse.merge.chat_template import BUILTIN_TEMPLATES
from tests.checkpoints import save_variants
from tests.helpers import assert_merge_close, require_peer
from tests.moe.tiny_models import WORDS, save_dense_models, word_tokenizer

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
NEW_WORDS = ["zebra", "yak"]
LOST_WORDS = ["bread", "wine"]
VOCABULARY_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def _own_vocabulary(folder: Path, words) -> None:
    """Give the model in `folder` the word tokenizer over `words`, its embedding and LM head rows
    moved to follow them (a word it did not have gets its row for '<unk>') and cut to that many."""
    old = word_tokenizer().get_vocab()
    tokenizer = word_tokenizer(words)
    new = tokenizer.get_vocab()
    rows = torch.tensor([old.get(token, old["<unk>"]) for token, _ in sorted(new.items(), key=lambda kv: kv[1])])
    model = AutoModelForCausalLM.from_pretrained(folder)
    state = {k: (v[rows] if k in VOCABULARY_KEYS else v) for k, v in model.state_dict().items()}
    model.resize_token_embeddings(len(new))
    model.load_state_dict(state)
    for path in folder.iterdir():
        path.unlink()
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """A base (the word tokenizer, 128 rows: more than its tokens), a fine-tune that added the
    ChatML tokens, and one with as many rows as tokens: the words in reverse order less LOST_WORDS
    (so that they are in the base and one other model), plus NEW_WORDS and the first ChatML token
    (in two models but not the base, so that their rows are averaged)."""
    root = tmp_path_factory.mktemp("vocab")
    base, chat, other = save_dense_models(root, "llama", 3, noise=0.05)
    tokenizer = word_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_TOKENS])
    tokenizer.save_pretrained(chat)
    _own_vocabulary(other, [w for w in reversed(WORDS) if w not in LOST_WORDS] + NEW_WORDS + CHAT_TOKENS[:1])
    return base, chat, other


def _run_mergekit(config: dict, out: Path) -> None:
    require_peer("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True))


def _merged(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict(), AutoTokenizer.from_pretrained(folder)


def _assert_matches_mergekit(config: dict, tmp_path: Path, operands: Sequence[Path] = ()) -> dict:
    """moefuse and mergekit give the same vocabulary, config vocab_size and tensors, the
    vocabulary tensors compared row by row for each token (mergekit orders a union's new tokens
    by a Python set, so ids may differ). For a 16-bit output, `operands` (the merged models) give
    the operands' magnitude (a result near 0 carries their rounding error): entrywise, and for the
    re-indexed vocabulary tensors the largest of their values."""
    merge_checkpoints(config, tmp_path / "moefuse", progress=False)
    _run_mergekit(config, tmp_path / "mergekit")
    (ours, our_tokenizer), (theirs, their_tokenizer) = _merged(tmp_path / "moefuse"), _merged(tmp_path / "mergekit")
    our_ids, their_ids = our_tokenizer.get_vocab(), their_tokenizer.get_vocab()
    assert set(our_ids) == set(their_ids)
    size = json.loads((tmp_path / "moefuse" / "config.json").read_text())["vocab_size"]
    assert size == json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"]
    assert set(ours) == set(theirs)
    states = [load_state(folder) for folder in operands]
    scales = {key: (torch.stack([state[key].float().abs().max() for state in states]).max() if key in VOCABULARY_KEYS
                    else torch.stack([state[key].float().abs() for state in states]).amax(0))
              for key in (states[0] if states else ())}
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        if key in VOCABULARY_KEYS:
            tokens = sorted(our_ids)
            rows = torch.tensor([our_ids[t] for t in tokens] + list(range(len(our_ids), size)))
            their_rows = torch.tensor([their_ids[t] for t in tokens] + list(range(len(our_ids), size)))
            scale = scales.get(key)  # rows of several orders: their largest value
            assert_merge_close(ours[key][rows], theirs[key][their_rows],
                               scale=None if scale is None else scale.expand(ours[key][rows].shape))
        else:
            assert_merge_close(ours[key], theirs[key], scale=scales.get(key))
    return our_ids


def _config(models, method="linear", **extra) -> dict:
    """A merge of `models` (the first is the base, which mergekit's tokenizer options need: without
    one, mergekit takes an arbitrary model as the base vocabulary)."""
    base, *others = models
    listed = models if method == "linear" else others
    config = {"merge_method": method, "base_model": str(base), **extra,
              "models": [{"model": str(m), "parameters": {"weight": 0.5 + 0.1 * i}} for i, m in enumerate(listed)]}
    if method == "ties":
        for entry in config["models"]:
            entry["parameters"]["density"] = 0.6
    return config


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
@pytest.mark.parametrize("source", ["base", "union", "chat model"])
def test_aligned_vocabularies_match_mergekit(tmp_path, vocab_models, method, source):
    tokenizer_source = str(vocab_models[1]) if source == "chat model" else source
    ids = _assert_matches_mergekit(_config(vocab_models, method, tokenizer_source=tokenizer_source), tmp_path)
    expected = set(word_tokenizer().get_vocab())
    if source != "base":
        expected |= set(CHAT_TOKENS)
    if source == "union":
        expected |= set(NEW_WORDS)
    assert set(ids) == expected


def test_token_rules_and_padding_match_mergekit(tmp_path, vocab_models):
    base, chat, other = map(str, vocab_models)
    tokens = {
        "<|im_start|>": {"source": chat},
        "zebra": {"source": {"kind": "zero"}},
        "yak": {"source": {"kind": "model_token", "model": other, "token": "dragon"}},
        "the": {"source": {"kind": "model_token", "model": base, "token_id": 5}, "force": True},
        "<extra>": {"source": {"kind": "model_token", "model": chat, "token": "<|im_end|>"}},
    }
    config = _config(vocab_models, "ties", tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 32})
    ids = _assert_matches_mergekit(config, tmp_path)
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "moefuse").state_dict()
    embed = state["model.embed_tokens.weight"]
    assert embed.shape[0] == 96 and "<extra>" in ids
    assert torch.equal(embed[len(ids):], embed[len(ids):][:1].expand(96 - len(ids), -1))  # padding: one mean row


def test_tied_base_matches_mergekit(tmp_path):
    base, chat, _ = save_dense_models(tmp_path / "in", "llama", 3, tied=True, noise=0.05)
    tokenizer = word_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_TOKENS])
    tokenizer.save_pretrained(chat)
    _assert_matches_mergekit(_config([base, chat], "task_arithmetic", tokenizer_source="union"), tmp_path)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_bf16_models_match_mergekit(tmp_path, method):
    """bf16 checkpoints merged with `dtype: float32`: the stand-in rows are means of the rows cast
    to fp32, as in mergekit. (Not `dtype: bfloat16`, where mergekit does the arithmetic itself in
    bf16 and differs by more than 1 ulp with or without vocabularies; nor bf16 TIES, whose 16-bit
    magnitude ties it breaks its own way: see tests/merge/test_merge_mixed_dtypes.py.)"""
    base, *chats = save_dense_models(tmp_path / "in", "llama", 3, noise=0.05, dtype=torch.bfloat16)
    tokenizer = word_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_TOKENS])
    for chat in chats:  # the ChatML rows are the mean of theirs
        tokenizer.save_pretrained(chat)
    config = _config([base, *chats], method, tokenizer_source="union", dtype="float32", out_dtype="bfloat16")
    _assert_matches_mergekit(config, tmp_path, operands=[base, *chats])


def test_slices_match_mergekit(tmp_path, vocab_models):
    base, chat, other = map(str, vocab_models)
    config = {"merge_method": "passthrough", "tokenizer_source": "union", "base_model": base,
              "slices": [{"sources": [{"model": base, "layer_range": [0, 1]}]},
                         {"sources": [{"model": chat, "layer_range": [1, 2]}]},
                         {"sources": [{"model": other, "layer_range": [1, 2]}]}]}
    with pytest.warns(UserWarning, match="in none of the merged models and get zero rows: .*'<\\|im_start\\|>'"):
        _assert_matches_mergekit(config, tmp_path)


def test_a_model_without_tokenizer_files_is_taken_to_use_the_base_tokenizer(tmp_path, vocab_models):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in vocab_models[1].iterdir():
        if not path.name.startswith("tokenizer"):
            (bare / path.name).write_bytes(path.read_bytes())
    _assert_matches_mergekit(_config([vocab_models[0], bare], "ties", tokenizer_source="base"), tmp_path)


def test_models_already_in_the_output_order_stream_unchanged(tmp_path, vocab_models):
    """Two models with the vocabulary of the third: nothing is re-indexed, the tokenizer is copied."""
    other = vocab_models[2]
    config = {"merge_method": "linear", "tokenizer_source": "base",
              "models": [{"model": str(other), "parameters": {"weight": 1.0}},
                         {"model": str(other), "parameters": {"weight": 1.0}}]}
    assert "0 tensor(s) re-indexed" in merge_checkpoints(config, tmp_path / "out", dry_run=True)
    merge_checkpoints(config, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    merged = load_state(tmp_path / "out")
    for key, tensor in load_state(other).items():
        assert torch.equal(merged[key], tensor)


def load_state(folder: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_union_output_generates_and_encodes_every_models_tokens(tmp_path, vocab_models):
    merge_checkpoints(_config(vocab_models, "ties", tokenizer_source="union"), tmp_path / "out", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("<|im_start|> the zebra").input_ids
    assert ids == [tokenizer.convert_tokens_to_ids(t) for t in ["<|im_start|>", "the", "zebra"]]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tokenizer.get_vocab())
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_differing_vocabularies_without_a_tokenizer_option_suggest_one(tmp_path, vocab_models):
    with pytest.raises(MergeInputError, match="tensor 'model.embed_tokens.weight': .* has shape \\[83, 64\\].*"
                                              "set tokenizer_source \\(base, union or a model\\)"):
        merge_checkpoints(_config(vocab_models), tmp_path / "out", progress=False)


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "either 'tokenizer_source' or 'tokenizer', not both"),
    ({"tokenizer": {"sauce": "base"}}, "tokenizer has unknown key\\(s\\) sauce; valid: source, tokens, pad_to_multiple_of"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of must be a positive integer, got 0"),
    ({"tokenizer": {"tokens": ["a"]}}, "tokenizer.tokens must map tokens to"),
    ({"tokenizer": {"tokens": {"a": {"force": True}}}}, "tokens\\['a'\\].force needs a source"),
    ({"tokenizer": {"tokens": {"a": {"source": {"kind": "mean"}}}}}, "kind must be one of model_token, zero"),
    ({"tokenizer": {"tokens": {"a": {"source": {"kind": "model_token", "model": "/m"}}}}},
     "needs 'model' and one of 'token' or 'token_id'"),
    ({"tokenizer": {"tokens": {"a": {"source": {"kind": "model_token", "model": "/m", "token_id": -1}}}}},
     "token_id must be a non-negative integer"),
])
def test_bad_tokenizer_options_are_refused(tmp_path, vocab_models, extra, message):
    with pytest.raises(MergeConfigError, match=message):
        merge_checkpoints(_config(vocab_models, **extra), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens, message", [
    ({"zebra": {"source": "/not/merged"}}, "names /not/merged, which is not one of the merged models \\(/"),
    ({"zebra": {"source": "BASE"}}, "has no token 'zebra'; use kind: model_token"),
    ({"zebra": {"source": {"kind": "model_token", "model": "BASE", "token": "okapi"}}}, "has no token 'okapi'"),
    ({"zebra": {"source": {"kind": "model_token", "model": "BASE", "token_id": 500}}}, "token_id 500 is past the 128 rows"),
])
def test_token_rules_that_cannot_be_followed_are_refused(tmp_path, vocab_models, tokens, message):
    tokens = json.loads(json.dumps(tokens).replace("BASE", str(vocab_models[0])))
    for dry_run in (True, False):  # refused while planning
        with pytest.raises(MergeConfigError, match=message):
            merge_checkpoints(_config(vocab_models, tokenizer={"tokens": tokens}), tmp_path / "out", progress=False,
                              dry_run=dry_run)
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_tokenizer_is_named(tmp_path, vocab_models):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in vocab_models[0].iterdir():
        if path.suffix == ".safetensors" or path.name in ("config.json", "model.safetensors.index.json"):
            (bare / path.name).write_bytes(path.read_bytes())
    with pytest.raises(MergeInputError, match=f"{bare} has no tokenizer .* which aligning the vocabularies"):
        merge_checkpoints(_config([bare, *vocab_models[1:]], tokenizer_source="union"), tmp_path / "out",
                          progress=False)


def _chat(folder: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                         tokenize=False)


def test_builtin_chat_templates_render(tmp_path, vocab_models):
    expected = {"chatml": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n",
                "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>",
                "mistral": "<s>[INST] hi [/INST]yo</s>",
                "alpaca": "### Instruction:\nhi\n\n### Response:\nyo</s>",
                "exaone": "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]yo[|endofturn|]\n"}
    assert set(expected) == set(BUILTIN_TEMPLATES)
    for name, text in expected.items():
        merge_checkpoints(_config(vocab_models[:2], chat_template=name), tmp_path / name, progress=False)
        assert _chat(tmp_path / name) == text
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert config["chat_template"] == BUILTIN_TEMPLATES[name]


def test_builtin_templates_take_system_messages(vocab_models):
    tokenizer = AutoTokenizer.from_pretrained(vocab_models[0])
    chat = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]

    def render(name, messages=chat):
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=BUILTIN_TEMPLATES[name],
                                             add_generation_prompt=True)

    assert render("mistral") == "<s>[INST] Be nice.\n\nhi [/INST]yo</s>[INST] bye [/INST]"
    assert render("alpaca") == ("Be nice.\n\n### Instruction:\nhi\n\n### Response:\nyo</s>\n\n"
                                "### Instruction:\nbye\n\n### Response:\n")
    assert render("exaone") == ("[|system|]Be nice.[|endofturn|]\n[|user|]hi\n[|assistant|]yo[|endofturn|]\n"
                                "[|user|]bye\n[|assistant|]")
    for broken in ([chat[1], chat[1]], [chat[1], {"role": "tool", "content": "x"}]):
        with pytest.raises(Exception, match="takes user and assistant turns in turn"):
            render("mistral", broken)


def test_auto_chat_template_takes_the_most_common_one(tmp_path, vocab_models):
    models = []
    for i, template in enumerate(["{{ 'A' }}{{ messages | length }}", "{{ 'B' }}{{ messages | length }}",
                                  "{{ 'B' }}{{ messages | length }}"]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for path in vocab_models[0].iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        (folder / "chat_template.jinja").write_text(template + "\n")
        models.append(folder)
    assert "\nchat template: auto\n" in merge_checkpoints(_config(models, chat_template="auto"), tmp_path / "out",
                                                         dry_run=True)
    merge_checkpoints(_config(models, chat_template="auto"), tmp_path / "out", progress=False)
    assert _chat(tmp_path / "out") == "B2"
    literal = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    assert f"chat template: the Jinja template given ({len(literal)} characters)" in merge_checkpoints(
        _config(models, chat_template=literal), tmp_path / "lit", dry_run=True)
    merge_checkpoints(_config(models, chat_template=literal), tmp_path / "lit", progress=False)
    assert _chat(tmp_path / "lit") == "hi|yo|"
    merge_checkpoints(_config(vocab_models[:2], chat_template="auto"), tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "chat_template.jinja").exists()  # no input has one: none is set


def test_a_missing_tokenizer_source_folder_is_named(tmp_path, vocab_models):
    with pytest.raises(MergeInputError, match=f"tokenizer folder {tmp_path / 'gone'} does not exist"):
        merge_checkpoints(_config(vocab_models, tokenizer_source=str(tmp_path / "gone")), tmp_path / "out",
                          progress=False)
    assert not (tmp_path / "out").exists()


def test_no_chat_template_is_written_without_a_tokenizer(tmp_path):
    folders = save_variants(tmp_path / "in", "llama", 2)  # weights and config only
    with pytest.warns(UserWarning, match="chat_template is not written: the output has no tokenizer"):
        merge_checkpoints(_config(folders, chat_template="chatml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


def test_a_rule_naming_a_model_a_slice_does_not_merge_is_refused_while_planning(tmp_path, vocab_models):
    """The embedding comes from the first slice, of the base alone: a rule taking a row from the
    chat model cannot be followed there, and --dry-run says so."""
    base, chat, _ = map(str, vocab_models)
    config = {"merge_method": "passthrough", "base_model": base,
              "tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": chat}}},
              "slices": [{"sources": [{"model": base, "layer_range": [0, 1]}]},
                         {"sources": [{"model": chat, "layer_range": [1, 2]}]}]}
    for dry_run in (True, False):
        with pytest.raises(MergeConfigError, match=f"source names {chat}, which a vocabulary tensor is not merged "
                                                   f"from \\({base}\\)"):
            merge_checkpoints(config, tmp_path / "out", progress=False, dry_run=dry_run)
    assert not (tmp_path / "out").exists()
