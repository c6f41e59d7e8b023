"""What every layer of the package shares: the error types a user sees and the label value the loss skips.

Nothing here imports the rest of the package, so any module may import it.
"""
from __future__ import annotations

import click

# Labels equal to this are not trained on (transformers' convention: ``CrossEntropyLoss(ignore_index=-100)``).
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the source and the field."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or inconsistent; the message names the file and tensor."""


class TokenizerError(ValueError):
    """A tokenizer directory or file cannot be used; the message names the file."""


class UserError(click.ClickException):
    """Bad input on the command line: printed as one clear line, exit code 2."""
    exit_code = 2
