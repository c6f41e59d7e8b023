"""Tokenizers from a model directory: ``tokenizer.json`` (Hugging Face ``tokenizers``) or a sentencepiece
``*.model``, with the special tokens of ``tokenizer_config.json`` and the chat template transformers would use."""
from __future__ import annotations

import functools
import json
import logging
from datetime import datetime
from pathlib import Path

from mindspore_llm.common import TokenizerError

log = logging.getLogger("mindspore_llm")

# Qwen2-Instruct's ChatML template: used (with a warning) when the tokenizer has no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Where a tokenizer directory keeps its chat template, first found wins: transformers' AutoTokenizer reads
# chat_template.jinja over tokenizer_config.json's "chat_template"; chat_template.json is the processors' older file
# (AutoProcessor), read when neither of the others has one.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")
# A tokenizer's files besides its vocabulary (tokenizer.json, vocab.json + merges.txt or a sentencepiece *.model):
# copied into every model directory written, so the model is rendered and tokenized there as in training.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files of the tokenizer at `path` (a directory, or its vocabulary file) that exist: to copy beside a model."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    vocabulary = ([path] if path.is_file() else
                  [directory / name for name in VOCABULARY_FILES if (directory / name).is_file()]
                  + sorted(directory.glob("*.model")))
    return vocabulary + [directory / name for name in CONFIG_FILES if (directory / name).is_file()]


class Tokenizer:
    """``encode``/``decode`` without added special tokens (as transformers' ``apply_chat_template`` tokenizes),
    ``encode_with_offsets`` (each token's character span), the special tokens of tokenizer_config.json and the chat
    template (``chat_template_source`` says where it came from; None: ChatML fallback)."""

    def __init__(self, encode_fn, decode_fn, token_to_id, vocab_size: int, config: dict, source: Path,
                 chat_template: str | None = None, chat_template_source: Path | None = None):
        self._encode = encode_fn  # text -> (ids, [(start, end) character offsets])
        self._decode = decode_fn
        self._token_to_id = token_to_id
        self.vocab_size = vocab_size
        self.config = config
        self.source = source
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        # special tokens tokenizer_config.json names that the vocabulary lacks: {"eos_token": "<|im_end|>"}
        self.missing_special_tokens: dict[str, str] = {}
        self.eos_token_id = self._special_id("eos_token")
        self.bos_token_id = self._special_id("bos_token")
        self.pad_token_id = self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        token = _token_text(self.config.get(key))  # a string or {"content": "<|endoftext|>", ...}
        if not token:
            return None
        token_id = self._token_to_id(token)
        if token_id is None:
            self.missing_special_tokens[key] = token
        return token_id

    def describe_special_token(self, key: str) -> str:
        """Why special token `key` has no id, naming the file: for error messages."""
        config = self.source.parent / "tokenizer_config.json"
        if key in self.missing_special_tokens:
            return (f"{key} {self.missing_special_tokens[key]!r} named in {config} is not a token of {self.source}")
        return f"{config} names no {key}"

    @property
    def template_description(self) -> str:
        return (f"chat template from {self.chat_template_source}" if self.chat_template_source is not None
                else "Qwen's ChatML chat template (fallback: the tokenizer has none)")

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in it."""
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render `messages` as transformers' ``apply_chat_template(..., tokenize=False)`` does: the tokenizer's
        template (ChatML when it has none, with a warning) in a sandboxed jinja2 environment, with the special
        tokens (``bos_token``, ``eos_token``, ...) as variables."""
        import jinja2

        if self.chat_template is None:
            _warn_chatml_fallback(self.source)
        variables = {key: _token_text(self.config.get(key))
                     for key in ("bos_token", "eos_token", "pad_token", "unk_token") if self.config.get(key)}
        variables.update(kwargs)
        # as transformers: keys whose value is None are dropped (templates test for a key, not for None)
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:  # a syntax error (compiling) or the template's raise_exception (rendering)
            return _compile_template(self.chat_template or CHATML_TEMPLATE).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{self.chat_template_source or 'ChatML'}: chat template: {err}") from None


@functools.lru_cache(maxsize=None)
def _warn_chatml_fallback(source: Path) -> None:
    """Once per tokenizer file: rendering with a template the model may never have seen is worth a loud line."""
    log.warning("%s: NO CHAT TEMPLATE (none in %s of %s): conversations are rendered with Qwen's ChatML template. "
                "If the model was trained with another template, put it in %s/chat_template.jinja.",
                source, ", ".join(CHAT_TEMPLATE_FILES), source.parent, source.parent)


def _token_text(token) -> str:
    return token.get("content") if isinstance(token, dict) else token


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """The environment of transformers' chat templates: sandboxed, trim_blocks/lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers; here it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def read_chat_template(directory: Path, config: dict) -> tuple[str | None, Path | None]:
    """(template, the file it came from) by transformers' precedence (CHAT_TEMPLATE_FILES); (None, None) if none.
    A set of named templates (a list of {"name", "template"}) gives its "default", as transformers without tools."""
    for name in CHAT_TEMPLATE_FILES:
        file = directory / name
        if not file.is_file():
            continue
        if name.endswith(".jinja"):
            return file.read_text(encoding="utf-8"), file
        try:
            source = config if name == "tokenizer_config.json" else json.loads(file.read_text(encoding="utf-8"))
            template = source.get("chat_template")
        except (json.JSONDecodeError, AttributeError) as err:
            raise TokenizerError(f"{file}: not a JSON object ({err})") from None
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            if "default" not in named:
                raise TokenizerError(f"{file}: chat_template names templates {sorted(map(str, named))} but no "
                                     f"'default'")
            template = named["default"]
        if template is not None:
            if not isinstance(template, str):
                raise TokenizerError(f"{file}: chat_template must be a string, got {type(template).__name__}")
            return template, file
    return None, None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a directory (tokenizer.json or a sentencepiece *.model) or a path to either file."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{config_file}: invalid JSON ({err})") from None
    template = read_chat_template(directory, config)
    candidates = [path] if path.is_file() else [directory / "tokenizer.json", *sorted(directory.glob("*.model"))]
    for file in candidates:
        if file.name.endswith(".json") and file.exists():
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(file))

            def encode(text):
                encoding = tok.encode(text, add_special_tokens=False)
                return encoding.ids, encoding.offsets

            return Tokenizer(encode, lambda ids: tok.decode(ids, skip_special_tokens=False), tok.token_to_id,
                             tok.get_vocab_size(), config, file, *template)
        if file.suffix == ".model" and file.exists():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(file))

            def piece_id(token):
                index = sp.piece_to_id(token)
                return None if index == sp.unk_id() and token != sp.id_to_piece(sp.unk_id()) else index

            def encode_pieces(text):
                # sentencepiece's offsets count UTF-8 bytes: map them to characters
                char_at = [i for i, char in enumerate(text) for _ in char.encode()] + [len(text)]
                pieces = sp.encode(text, return_type="proto").pieces
                return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

            return Tokenizer(encode_pieces, sp.decode, piece_id, sp.get_piece_size(), config, file, *template)
    raise TokenizerError(f"{path}: no tokenizer.json or sentencepiece *.model found")
