"""The merged model's chat template (mergekit's `chat_template` option).

The option is `auto` (the template most of the input models share, by plurality; none set when no
input has one), the name of a built-in template (BUILTIN_TEMPLATES: moefuse's own renderings of
the chatml, llama3, mistral, alpaca and exaone formats, the names mergekit ships), or a Jinja
template itself.
The template is written where every transformers version finds it: `chat_template.jinja` (read
first by transformers 5), the `chat_template` entry of tokenizer_config.json (older versions), and
chat_template.json if the tokenizer source had one (processors).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

from moefuse.errors import MergeConfigError
from moefuse.io.local_files import read_json_object

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # A leading system message is folded into the first user turn; turns must then alternate.
    "mistral": (
        "{% set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
        "{% set turns = messages[1:] if system else messages %}"
        "{{ bos_token }}{% for message in turns %}"
        "{% if message['role'] not in ('user', 'assistant') or (message['role'] == 'user') != loop.index0 is even %}"
        "{{ raise_exception('the mistral chat template takes user and assistant turns in turn, after an optional "
        "system message') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # System text first; instructions, inputs (role user_context) and responses in sections.
    "alpaca": (
        "{% for message in messages %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] | trim }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim + eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    # EXAONE 3: an empty system turn when the conversation has none.
    "exaone": (
        "{% if not messages or messages[0]['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
MIN_TEMPLATE_LENGTH = 20  # shorter text with no '{' is a misspelt name, not a template


def check_chat_template(value: Any) -> str:
    """Refuse a `chat_template` option that is not `auto`, a built-in name or a Jinja template."""
    if isinstance(value, str) and (value == "auto" or value in BUILTIN_TEMPLATES
                                   or (len(value) >= MIN_TEMPLATE_LENGTH and "{" in value)):
        return value
    raise MergeConfigError(f"config: chat_template {value!r} is neither 'auto', a built-in template "
                           f"({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template")


def model_chat_template(folder: Path) -> Optional[str]:
    """The chat template a model folder's tokenizer carries, if any (the way transformers looks:
    chat_template.jinja, then tokenizer_config.json; a list of named templates gives its `default`)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _json_object(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def resolve_chat_template(setting: str, folders: Iterable[Path]) -> Optional[str]:
    """The template `setting` stands for; with `auto`, the one most of `folders` carry (stripped;
    the first seen among equally common ones), None if none carries one."""
    if setting != "auto":
        return BUILTIN_TEMPLATES.get(setting, setting)
    templates = [t.strip() for t in map(model_chat_template, folders) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def write_chat_template(dest: Path, template: str) -> None:
    """Make `template` the chat template of the tokenizer saved in `dest`."""
    (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = dest / name
        if path.is_file():
            data = _json_object(path)
            data["chat_template"] = template
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _json_object(path: Path) -> dict:
    """The JSON object in `path` ({} if there is no such file)."""
    return read_json_object(path) if path.is_file() else {}
