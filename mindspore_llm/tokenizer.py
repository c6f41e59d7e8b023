"""Tokenizers from a model directory: ``tokenizer.json`` (Hugging Face ``tokenizers``) or a sentencepiece
``*.model``, with the special tokens and chat template of ``tokenizer_config.json`` when present."""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from mindspore_llm.common import TokenizerError

# Qwen2-Instruct's ChatML template: used when tokenizer_config.json has no chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    def __init__(self, encode_fn, decode_fn, token_to_id, vocab_size: int, config: dict, source: Path):
        self._encode = encode_fn
        self._decode = decode_fn
        self._token_to_id = token_to_id
        self.vocab_size = vocab_size
        self.config = config
        self.source = source
        self.chat_template: str | None = config.get("chat_template")
        self.eos_token_id = self._special_id("eos_token")
        self.bos_token_id = self._special_id("bos_token")
        self.pad_token_id = self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        token = _token_text(self.config.get(key))  # a string or {"content": "<|endoftext|>", ...}
        return self._token_to_id(token) if token else None

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render `messages` as transformers' ``apply_chat_template(..., tokenize=False)`` does: the
        tokenizer_config.json template (ChatML when absent) in a sandboxed jinja2 environment, with the special
        tokens (``bos_token``, ``eos_token``, ...) as variables."""
        import jinja2

        variables = {key: _token_text(self.config.get(key))
                     for key in ("bos_token", "eos_token", "pad_token", "unk_token") if self.config.get(key)}
        variables.update(kwargs)
        # as transformers: keys whose value is None are dropped (templates test for a key, not for None)
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:  # a syntax error (compiling) or the template's raise_exception (rendering)
            return _compile_template(self.chat_template or CHATML_TEMPLATE).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{self.source}: chat template: {err}") from None


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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a directory (tokenizer.json or a sentencepiece *.model) or a path to either file."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    candidates = [path] if path.is_file() else [directory / "tokenizer.json", *sorted(directory.glob("*.model"))]
    for file in candidates:
        if file.name.endswith(".json") and file.exists():
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(file))
            return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids,
                             lambda ids: tok.decode(ids, skip_special_tokens=False),
                             tok.token_to_id, tok.get_vocab_size(), config, file)
        if file.suffix == ".model" and file.exists():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(file))

            def piece_id(token):
                index = sp.piece_to_id(token)
                return None if index == sp.unk_id() and token != sp.id_to_piece(sp.unk_id()) else index

            return Tokenizer(sp.encode, sp.decode, piece_id, sp.get_piece_size(), config, file)
    raise TokenizerError(f"{path}: no tokenizer.json or sentencepiece *.model found")
