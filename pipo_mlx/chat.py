"""A conversation over a prompt cache: each turn prefills only its new tokens."""

import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decode import PipoResponse, stream_generate
from .errors import PipoError
from .model import PipoModel
from .prompt_cache import make_prompt_cache
from .prompt_cache_file import PromptCacheFile

QUERY = "<query>"  # stands for the message when its template's text is cut after a cached start


class ChatSession:
    """A conversation whose caches persist, so each turn prefills only its new tokens.

    `options` are `stream_generate`'s, the KV-cache ones included (they hold for
    the whole conversation). Without a chat template (or with
    `use_chat_template=False`) each query is sent as raw text.
    `chat_template_kwargs` go to every `apply_chat_template` call (e.g.
    `{"enable_thinking": false}`). With `cached` (a prompt-cache file from
    `pipo_mlx.cache_prompt`) the conversation starts from its caches, and the
    first query continues the user message they began; `reset` goes back there.
    """

    def __init__(
        self,
        model: PipoModel,
        tokenizer: TokenizerWrapper,
        system_prompt: Optional[str] = None,
        use_chat_template: bool = True,
        chat_template_kwargs: Optional[Dict[str, Any]] = None,
        cached: Optional[PromptCacheFile] = None,
        **options: Any,
    ):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.cached = cached
        self.use_chat_template = use_chat_template and tokenizer.has_chat_template
        if cached is not None and cached.chat != self.use_chat_template:
            raise PipoError(
                "the prompt-cache file was made "
                + ("with a chat template, so its queries need one too" if cached.chat
                   else "from raw text, so its queries must be raw text too (skip the chat template)")
            )
        if system_prompt is not None and not self.use_chat_template:
            why = "has no chat template" if use_chat_template else "is told to skip its chat template"
            raise PipoError(
                f"a system prompt needs a chat template, and the tokenizer {why}; "
                "drop the system prompt or put it in the prompt text"
            )
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        if self.cached is None:
            self.cache = make_prompt_cache(self.model, self.options.get("max_kv_size"))
        else:  # a copy: the loaded caches stay as they are for the next reset
            self.cache = copy.deepcopy(self.cached.cache)
        self.pending = list(self.cached.pending) if self.cached is not None else []
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
            ids = tok.encode(query, add_special_tokens=not self.cache.tokens)
            return self.pending + ids, query

        def render(messages: List[Dict[str, Any]]) -> str:
            return tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **self.template_kwargs
            )

        messages = self.messages + [{"role": "user", "content": query}]
        if self.cached is not None and not self.rendered:
            # The caches hold the start of this user message (a cache file's prompt):
            # as mlx-lm's generate does, send what the template puts from the query on.
            marked = render(self.messages + [{"role": "user", "content": QUERY}])
            text = marked[marked.index(QUERY) :].replace(QUERY, query, 1)
        elif (full := render(messages)).startswith(self.rendered):
            text = full[len(self.rendered) :]
        else:
            # The template rewrote an earlier turn (e.g. dropped its reasoning);
            # as mlx-lm's chat does, render the new message alone.
            text = render(messages[-1:])
        return self.pending + tok.encode(text, add_special_tokens=False), text

    def turn(self, query: str) -> Iterator[PipoResponse]:
        """Stream the reply to `query`; the caches keep it for the next turn."""
        ids, text = self.prompt_ids(query)
        reply = ""
        for response in stream_generate(
            self.model, self.tokenizer, ids, prompt_cache=self.cache, **self.options
        ):
            self.pending = []  # read into the caches with the prompt
            reply += response.text
            yield response
        self.messages += [
            {"role": "user", "content": query},
            {"role": "assistant", "content": reply},
        ]
        self.rendered += text + reply
        if response.finish_reason == "stop":
            self.rendered += self.tokenizer.decode([response.token])

