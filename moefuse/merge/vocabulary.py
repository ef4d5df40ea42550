"""Align the models' vocabularies before merging (mergekit's `tokenizer_source` / `tokenizer`).

When the config names a tokenizer, the output vocabulary is that tokenizer's: the base model's
(`base`), one folder's (a path), or the union of every model's (`union`: the base's tokens, then
the other models' new tokens in config order, then their new added tokens). Every vocabulary
tensor (embeddings, LM head: rows indexed by token id) of every model is then re-indexed by token
string: row i of model m becomes m's row for output token i. A token that m lacks (or whose rule
says `force`) gets a stand-in row, as in mergekit:

- the rule's source from `tokenizer.tokens`: a model's row for the token, a model's row for
  another token (`kind: model_token`), or zeros (`kind: zero`);
- otherwise the row of the only model that has the token; else the base's, if it has the token;
  else the mean of the rows of the models that have it; zeros if none has it.

With `pad_to_multiple_of`, the rows past the vocabulary (up to the next multiple) hold each
model's mean row. A model's ids at or past its config's `vocab_size` count as absent. A model
folder without tokenizer files is taken to use the base's tokenizer. The output config's
`vocab_size` is the new row count. Models whose rows already match the output vocabulary keep
their streamed, memory-mapped path; re-indexed tensors are copies in memory.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from moefuse.errors import MergeConfigError, MergeInputError
from moefuse.io.local_files import has_tokenizer_files, read_model_config
from moefuse.io.output import TOKENIZER_FILES
from moefuse.merge.config import TokenRule, TokenSource, VocabularyConfig
from moefuse.merge.plan import MergePlan, Source, is_vocabulary_tensor


@dataclass
class ModelVocabulary:
    """A model's tokenizer and its token -> row map (ids below its `rows`)."""

    folder: Path
    tokenizer: Any
    ids: Dict[str, int]
    rows: int


def _load_tokenizer(folder: Path):
    if not folder.is_dir():
        raise MergeInputError(f"tokenizer folder {folder} does not exist or is not a folder; check the path")
    if not has_tokenizer_files(folder):
        raise MergeInputError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), which aligning "
                              "the vocabularies (tokenizer_source or tokenizer in the config) needs; copy its "
                              "tokenizer files into it, or remove tokenizer_source/tokenizer to merge rows as stored")
    from transformers import AutoTokenizer  # only merges that align vocabularies pay for importing it

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many kinds for a broken tokenizer
        raise MergeInputError(f"the tokenizer of {folder} could not be loaded ({type(error).__name__}: {error}); "
                              "repair its tokenizer files") from None


def _configured_rows(folder: Path, default: int) -> int:
    """The number of vocabulary rows `folder`'s config.json declares (`vocab_size`)."""
    config = read_model_config(folder)
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) else default


def model_vocabulary(folder: Path, fallback: Optional[ModelVocabulary] = None) -> ModelVocabulary:
    """`folder`'s vocabulary; a folder without tokenizer files gets `fallback`'s tokens."""
    tokenizer = _load_tokenizer(folder) if fallback is None or has_tokenizer_files(folder) else fallback.tokenizer
    vocab = tokenizer.get_vocab()
    rows = _configured_rows(folder, len(vocab))
    return ModelVocabulary(folder, tokenizer, {token: i for token, i in vocab.items() if i < rows}, rows)


def _union_tokenizer(base: ModelVocabulary, others: List[ModelVocabulary]):
    """A fresh copy of the base's tokenizer with the others' new tokens added: plain tokens first,
    then added tokens (a token some model added, with that first model's settings), each group in
    model order, then by id."""
    union = _load_tokenizer(base.folder)
    plain: Dict[str, None] = {}
    added: Dict[str, Any] = {}
    for model in [base, *others]:
        own_added = {t.content: t for i, t in model.tokenizer.added_tokens_decoder.items() if i < model.rows}
        for token, _ in sorted(model.ids.items(), key=lambda item: item[1]):
            if token in own_added:
                added.setdefault(token, own_added[token])
            else:
                plain.setdefault(token)
    known = set(union.get_vocab())
    union.add_tokens([token for token in plain if token not in known and token not in added])
    union.add_tokens([setting for token, setting in added.items() if token not in known])
    return union


def _check_rows(model: ModelVocabulary) -> None:
    """Refuse a tokenizer that is to be the output's but has ids past its model's rows."""
    if len(model.ids) < len(model.tokenizer.get_vocab()):
        raise MergeInputError(
            f"the tokenizer of {model.folder} has tokens with ids at or past its config's vocab_size ({model.rows}), "
            "which its weights have no rows for; fix vocab_size in its config.json or use another tokenizer source")


class OutputVocabulary:
    """The merged model's vocabulary and how each model's rows map onto it."""

    def __init__(self, config: VocabularyConfig, models: List[ModelVocabulary], base: ModelVocabulary):
        self.rules: Dict[str, TokenRule] = dict(config.tokens)
        self.models = {model.folder.resolve(): model for model in models}
        self.base = base
        if config.source == "union":
            self.source_name = "the union of the models' tokenizers"
            _check_rows(base)
            tokenizer = _union_tokenizer(base, [m for m in models if m is not base])
            self.copy_from = base.folder if len(tokenizer.get_vocab()) == len(base.tokenizer.get_vocab()) else None
        else:
            folder = base.folder if config.source == "base" else Path(config.source)
            source = self.models.get(folder.resolve())
            if source is not None:
                _check_rows(source)
            self.source_name = f"the tokenizer of {folder}"
            self.copy_from = folder
            tokenizer = _load_tokenizer(folder) if source is None else source.tokenizer
        missing = [token for token in self.rules if token not in tokenizer.get_vocab()]
        if missing:
            if self.copy_from is not None:  # a fresh copy: the models' own tokenizers stay as they are
                tokenizer = _load_tokenizer(self.copy_from)
            tokenizer.add_tokens(missing)
            self.copy_from = None
        self.tokenizer = tokenizer
        self.ids: Dict[str, int] = tokenizer.get_vocab()
        self.tokens = max(self.ids.values(), default=-1) + 1
        multiple = config.pad_to_multiple_of or 1
        self.size = -(-self.tokens // multiple) * multiple
        self.forced = torch.zeros(self.tokens, dtype=torch.bool)
        for token, rule in self.rules.items():
            self.forced[self.ids[token]] = rule.force
            if rule.source is not None and rule.source.kind != "zero":
                self._source_row(token, rule.source)
        self._index: Dict[Path, torch.Tensor] = {}

    def model(self, folder: Path) -> ModelVocabulary:
        return self.models[Path(folder).resolve()]

    def index(self, folder: Path) -> torch.Tensor:
        """Per output token id, the row of `folder`'s model holding it (-1: it lacks the token)."""
        key = Path(folder).resolve()
        if key not in self._index:
            own = self.models[key].ids
            index = torch.full((self.tokens,), -1, dtype=torch.long)
            pairs = [(new, own[token]) for token, new in self.ids.items() if token in own]
            if pairs:
                new, old = torch.tensor(pairs, dtype=torch.long).T
                index[new] = old
            self._index[key] = index
        return self._index[key]

    def unchanged(self, folder: Path, rows: int) -> bool:
        """True when a tensor of `rows` rows of `folder`'s model is already in output order."""
        return (rows == self.size == self.tokens and not bool(self.forced.any())
                and torch.equal(self.index(folder), torch.arange(self.tokens)))

    def _source_row(self, token: str, source: TokenSource) -> int:
        """The row of `source.model` a rule for `token` takes (checked before any data is read)."""
        where = f"config: tokenizer.tokens[{token!r}].source"
        model = self.models.get(source.model.resolve())
        if model is None:
            raise MergeConfigError(f"{where} names {source.model}, which is not one of the merged models "
                                   f"({', '.join(str(m.folder) for m in self.models.values())})")
        if source.kind == "model":
            if token not in model.ids:
                raise MergeConfigError(f"{where}: {source.model} has no token {token!r}; use kind: model_token "
                                       "to take another token's row")
            return model.ids[token]
        if source.token is not None:
            if source.token not in model.ids:
                raise MergeConfigError(f"{where}: {source.model} has no token {source.token!r}")
            return model.ids[source.token]
        if source.token_id >= model.rows:
            raise MergeConfigError(f"{where}.token_id {source.token_id} is past the {model.rows} rows of {source.model}")
        return source.token_id

    def check_rules(self, folders: List[Path]) -> None:
        """Refuse a rule that takes a row from a model the tensor of `folders`' models is not
        merged from (a slice's), for a token that tensor needs a stand-in for."""
        resolved = [folder.resolve() for folder in folders]
        index = torch.stack([self.index(folder) for folder in folders])
        needed = (index < 0).any(0) | self.forced
        for token, rule in self.rules.items():
            source = rule.source
            if source is not None and source.kind != "zero" and needed[self.ids[token]] \
                    and source.model.resolve() not in resolved:
                raise MergeConfigError(f"config: tokenizer.tokens[{token!r}].source names {source.model}, which a "
                                       f"vocabulary tensor is not merged from ({', '.join(map(str, folders))})")

    def _rule_row(self, token: str, source: TokenSource, folders: List[Path],
                  tensors: List[torch.Tensor]) -> torch.Tensor:
        """The stand-in row a `tokenizer.tokens` rule's `source` gives `token` (see `check_rules`)."""
        if source.kind == "zero":
            return tensors[0].new_zeros(tensors[0].shape[1:])
        position = [folder.resolve() for folder in folders].index(source.model.resolve())
        return tensors[position][self._source_row(token, source)]

    def _stand_ins(self, folders: List[Path], tensors: List[torch.Tensor], index: torch.Tensor,
                   needed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stand-in row (in `dtype`) of every `needed` output token, in mergekit's order of precedence."""
        present = index >= 0
        count = present.sum(0)
        rows = torch.zeros((self.tokens, *tensors[0].shape[1:]), dtype=dtype)
        automatic = needed.clone()
        for token, rule in self.rules.items():
            token_id = self.ids[token]
            if rule.source is not None and needed[token_id]:
                rows[token_id] = self._rule_row(token, rule.source, folders, tensors)
                automatic[token_id] = False
        base = next((i for i, f in enumerate(folders) if f.resolve() == self.base.folder.resolve()), None)
        from_base = automatic & (count > 1) & (present[base] if base is not None else False)
        averaged = automatic & (count > 1) & ~from_base
        total = rows.new_zeros((int(averaged.sum()), *rows.shape[1:]))
        for m, tensor in enumerate(tensors):
            only = automatic & (count == 1) & present[m]
            rows[only] = tensor[index[m][only]].to(dtype)
            if m == base:
                rows[from_base] = tensor[index[m][from_base]].to(dtype)
            contributes = present[m][averaged]
            total[contributes] = total[contributes] + tensor[index[m][averaged & present[m]]].to(dtype)
        rows[averaged] = total / count[averaged].view(-1, *[1] * (rows.dim() - 1)).to(rows.dtype)
        absent = automatic & (count == 0)
        if absent.any():
            names = [t for t, i in self.ids.items() if absent[i]]
            warnings.warn(f"{len(names)} token(s) of the output vocabulary are in none of the merged models and get "
                          f"zero rows: {', '.join(map(repr, names[:5]))}{' ...' if len(names) > 5 else ''}", stacklevel=2)
        return rows

    def align(self, folders: List[Path], tensors: List[torch.Tensor],
              dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        """Each of `tensors` (one vocabulary tensor of the models in `folders`, rows first) with
        its rows in output order, in `dtype` (default: the one torch promotes them to); stand-in
        means are computed in it, as mergekit computes them in its gathered tensors' dtype."""
        dtype = dtype or functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        index = torch.stack([self.index(folder) for folder in folders])
        needed = (index < 0).any(0) | self.forced
        stand_ins = self._stand_ins(folders, tensors, index, needed, dtype) if needed.any() else None
        aligned = []
        for m, tensor in enumerate(tensors):  # rows are cast as they are gathered: no cast copy of a whole input
            out = torch.zeros((self.size, *tensor.shape[1:]), dtype=dtype)
            own = (index[m] >= 0) & ~self.forced
            out[:self.tokens][own] = tensor[index[m][own]].to(dtype)
            if stand_ins is not None:
                out[:self.tokens][~own] = stand_ins[~own]
            if self.size > self.tokens:
                out[self.tokens:] = out[:self.tokens].mean(0)
            aligned.append(out)
        return aligned

    def save(self, dest: Path) -> None:
        """Save the output tokenizer in `dest` (when it is new: else `copy_from`'s files serve)."""
        self.tokenizer.save_pretrained(str(dest))

    def describe(self, aligned: int) -> str:
        """One line for --dry-run: the output vocabulary and how many tensors are re-indexed."""
        return (f"vocabulary: {self.tokens} tokens ({self.source_name}), {self.size} rows; "
                f"{aligned} tensor(s) re-indexed by token, in memory")


class AlignedRows:
    """One vocabulary tensor of every model of a task, re-indexed to the output vocabulary when
    the first of them is read; each is handed out once."""

    def __init__(self, vocabulary: OutputVocabulary, sources: List[Source], dtype: Optional[torch.dtype]):
        self.vocabulary = vocabulary
        self.sources = sources
        self.dtype = dtype
        self._tensors: Optional[List[Optional[torch.Tensor]]] = None

    def tensor(self, position: int) -> torch.Tensor:
        if self._tensors is None:
            read = [source.read() for source in self.sources]
            self._tensors = self.vocabulary.align([s.reader.folder for s in self.sources], read, self.dtype)
            for source in self.sources:
                source.release()
        tensor, self._tensors[position] = self._tensors[position], None
        return tensor


def align_vocabulary(plan: MergePlan) -> None:
    """Build the output vocabulary `plan.config.vocabulary` asks for and re-index every vocabulary
    tensor whose models' rows do not already match it."""
    first, *others = plan.folders
    base = model_vocabulary(first)
    vocabularies = [base] + [model_vocabulary(folder, fallback=base) for folder in others]
    vocabulary = OutputVocabulary(plan.config.vocabulary, vocabularies, base)
    for task in plan.tasks:
        if not task.merge or not is_vocabulary_tensor(task.key):
            continue
        sources = task.sources
        if all(vocabulary.unchanged(s.reader.folder, s.reader.info(s.key).shape[0]) for s in sources):
            continue
        vocabulary.check_rules([source.reader.folder for source in sources])
        rows = AlignedRows(vocabulary, sources, task.compute_dtype)
        moved = [replace(source, aligned=(rows, i)) for i, source in enumerate(sources)]
        if task.base is not None:
            task.base, moved = moved[0], moved[1:]
        task.inputs = moved
        task.shape = (vocabulary.size, *task.shape[1:])
    if vocabulary.size != _configured_rows(plan.config_source, vocabulary.size):
        plan.config_updates["vocab_size"] = vocabulary.size
    plan.vocabulary = vocabulary
