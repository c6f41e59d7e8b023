"""Tokenizers from a model directory: ``tokenizer.json`` (Hugging Face ``tokenizers``) or a sentencepiece
``*.model``, with the special tokens and chat template of ``tokenizer_config.json`` when present."""
from __future__ import annotations

import json
from pathlib import Path


class TokenizerError(ValueError):
    pass


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
        token = self.config.get(key)
        if isinstance(token, dict):  # {"content": "<|endoftext|>", ...}
            token = token.get("content")
        return self._token_to_id(token) if token else None

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


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
