"""The tokenizer overrides mlx-lm's generate and server take: extra end-of-sequence
tokens, another chat template, and keyword arguments for the template."""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import PipoError


def add_eos_tokens(tokenizer: TokenizerWrapper, tokens: Sequence[str]) -> None:
    """Make each of `tokens` (a token's text, or its id) end generation, as mlx-lm's
    `--extra-eos-token` does; a token the vocabulary lacks is refused."""
    vocab = tokenizer.get_vocab()
    for token in tokens:
        # Checked here: for an unknown text mlx-lm would add the unknown-token id.
        if not (int(token) < len(vocab) if token.isdigit() else token in vocab):
            raise PipoError(f"extra end-of-sequence token {token!r} is not a token of this tokenizer")
        tokenizer.add_eos_token(token)


def read_chat_template(spec: str) -> str:
    """A Jinja chat template: the text of the file `spec` names, or `spec` itself."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PipoError(f"cannot read the chat template {path} ({e})") from None
    if "{{" in spec or "{%" in spec:
        return spec
    raise PipoError(f"chat template {spec!r} is neither a file nor a Jinja template")


def set_chat_template(tokenizer: TokenizerWrapper, template: Optional[str]) -> None:
    """Render chats with `template` instead of the tokenizer's own (None: keep it)."""
    if template is None:
        return
    tokenizer.chat_template = template  # the Hugging Face tokenizer renders with it
    tokenizer.has_chat_template = True


def template_kwargs(text: Optional[str], flag: str) -> Dict[str, Any]:
    """The JSON object `text` (from the option `flag`) as keyword arguments for
    `apply_chat_template`, e.g. '{"enable_thinking": false}'."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipoError(f"{flag} is not valid JSON ({e.msg}); pass e.g. '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise PipoError(f"{flag} must be a JSON object of keyword arguments, got {text!r}")
    return value
