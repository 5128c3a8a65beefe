"""A conversation over a prompt cache: each turn prefills only its new tokens."""

from typing import Any, Iterator, List, Optional, Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decode import PipoResponse, stream_generate
from .errors import PipoError
from .model import PipoModel
from .prompt_cache import make_prompt_cache


class ChatSession:
    """A conversation whose caches persist, so each turn prefills only its new tokens.

    `options` are `stream_generate`'s, the KV-cache ones included (they hold for
    the whole conversation). Without a chat template (or with
    `use_chat_template=False`) each query is sent as raw text.
    """

    def __init__(
        self,
        model: PipoModel,
        tokenizer: TokenizerWrapper,
        system_prompt: Optional[str] = None,
        use_chat_template: bool = True,
        **options: Any,
    ):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.use_chat_template = use_chat_template and tokenizer.has_chat_template
        if system_prompt is not None and not self.use_chat_template:
            why = "has no chat template" if use_chat_template else "is told to skip its chat template"
            raise PipoError(
                f"a system prompt needs a chat template, and the tokenizer {why}; "
                "drop the system prompt or put it in the prompt text"
            )
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model, self.options.get("max_kv_size"))
        self.messages = (
            []
            if self.system_prompt is None
            else [{"role": "system", "content": self.system_prompt}]
        )
        self.rendered = ""  # the text the caches hold, when it follows the template

    def prompt_ids(self, query: str) -> Tuple[List[int], str]:
        """The new tokens for `query` and the text they render."""
        tok = self.tokenizer
        if not self.use_chat_template:
            return tok.encode(query, add_special_tokens=not self.cache.tokens), query
        messages = self.messages + [{"role": "user", "content": query}]
        full = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if full.startswith(self.rendered):
            text = full[len(self.rendered) :]
        else:
            # The template rewrote an earlier turn (e.g. dropped its reasoning);
            # as mlx-lm's chat does, render the new message alone.
            text = tok.apply_chat_template(
                messages[-1:], add_generation_prompt=True, tokenize=False
            )
        return tok.encode(text, add_special_tokens=False), text

    def turn(self, query: str) -> Iterator[PipoResponse]:
        """Stream the reply to `query`; the caches keep it for the next turn."""
        ids, text = self.prompt_ids(query)
        reply = ""
        for response in stream_generate(
            self.model, self.tokenizer, ids, prompt_cache=self.cache, **self.options
        ):
            reply += response.text
            yield response
        self.messages += [
            {"role": "user", "content": query},
            {"role": "assistant", "content": reply},
        ]
        self.rendered += text + reply
        if response.finish_reason == "stop":
            self.rendered += self.tokenizer.decode([response.token])

