"""PIPO in lm-evaluation-harness: `PipoLM`, an `lm_eval` language model.

The only module of the package that imports `lm_eval` (the optional extra
`eval`); nothing else imports this one, so the core package does not need it.

- `loglikelihood`: the continuation's log-probability from one teacher-forced
  pass over its row (`likelihood.request_row`): the context paired as the
  decoder pairs a prompt, the continuation in the chosen layout; token1 slots
  scored by the backbone, token2 slots by the MTP head. "Greedy" means every
  continuation token is its slot's argmax.
- `loglikelihood_rolling`: lm-eval's rolling windows, each window a request.
- `generate_until`: PIPO decoding (`decode.stream_generate`) at the chosen
  threshold and drafting policy, stopped at the first stop string; the keep
  rate of all generations is in `figures()`.

Tokenization follows lm-eval's reference model: trailing spaces of the context
move to the continuation, the continuation's tokens are those of the whole
text after the context's, and an empty context is the BOS token (EOS where the
tokenizer has none).
"""

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .decode import recommended_threshold, stream_generate
from .drafting import check_draft
from .likelihood import DEFAULT_LAYOUT, check_layout, pipo_slot_scores, request_row
from .model import PipoModel
from .quality import Progress

DEFAULT_GEN_TOKENS = 256  # lm-eval's own default for max_gen_toks


def stderr_log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


class PipoLM(LM):
    """A PIPO model as lm-eval's `LM`. `sampler` and `logits_processors` are mlx-lm's
    (default greedy); tasks' own sampling settings are not used, as with mlx_lm.evaluate."""

    def __init__(
        self,
        model: PipoModel,
        tokenizer: TokenizerWrapper,
        *,
        layout: str = DEFAULT_LAYOUT,
        batch_size: int = 8,
        max_tokens: Optional[int] = None,
        conf_threshold: Optional[float] = None,
        draft: Optional[str] = None,
        sampler: Optional[Callable] = None,
        logits_processors: Optional[List[Callable]] = None,
        use_chat_template: bool = False,
        chat_template_args: Optional[Dict[str, Any]] = None,
        log: Callable[[str], Any] = stderr_log,
    ):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.layout = check_layout(layout)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.conf_threshold = recommended_threshold(model, conf_threshold)
        self.draft = check_draft(draft)
        self.sampler, self.logits_processors = sampler, logits_processors
        self.use_chat_template = use_chat_template
        self.chat_template_args = chat_template_args or {}
        self.log = log
        self.context = model.args.max_position_embeddings
        self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.counts = {"generations": 0, "tokens": 0, "steps": 0, "token2_kept": 0}

    # -- tokens

    def _encode(self, text: str) -> List[int]:
        # A rendered chat template carries its own special tokens.
        return list(self.tokenizer.encode(text, add_special_tokens=not self.use_chat_template))

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix], self._encode(continuation)
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    def _fitted_row(self, ctx: List[int], cont: List[int]) -> Optional[Tuple[List[int], List[int]]]:
        """The request's row, its context cut from the left to fit the model's context;
        None when even one context token leaves no room for the continuation."""
        pad = self.model.pad_token_id
        # The continuation's slots alone bound the context; pairing PADs may cost one or two more.
        k = min(len(ctx), self.context - len(cont) * (1 if self.layout == "pairs" else 2))
        while k >= 1:
            row, slots = request_row(ctx[len(ctx) - k:], cont, pad, self.layout)
            if len(row) <= self.context:
                return row, slots
            k -= 1
        return None

    # -- lm-eval's three requests

    def _score(self, requests: Sequence[Tuple[List[int], List[int]]], what: str) -> List[Tuple[float, bool]]:
        fitted = [self._fitted_row(c, x) for c, x in requests]
        results: List[Tuple[float, bool]] = [(float("-inf"), False)] * len(requests)
        # Longest first: a batch's rows have similar lengths and little padding.
        order = sorted((i for i, f in enumerate(fitted) if f), key=lambda i: -len(fitted[i][0]))
        progress = Progress(what, len(order), "requests", log=self.log)
        for s in range(0, len(order), self.batch_size):
            batch = order[s : s + self.batch_size]
            scores = pipo_slot_scores(self.model, [fitted[i][0] for i in batch])
            for i, (logprob, greedy) in zip(batch, scores):
                slots = fitted[i][1]
                results[i] = (float(logprob[slots].sum()), bool(greedy[slots].all()))
            progress.step(len(batch))
        if len(order) < len(requests):
            self.log(f"{len(requests) - len(order)} requests longer than the model's context of "
                     f"{self.context} scored -inf")
        return results

    def loglikelihood(self, requests: List[Any]) -> List[Tuple[float, bool]]:
        return self._score([self._encode_pair(*r.args) for r in requests], "loglikelihood")

    def loglikelihood_rolling(self, requests: List[Any]) -> List[float]:
        # The window leaves room for the pairing PADs (and, in the token1 layout, one per token).
        window = self.context - 2 if self.layout == "pairs" else self.context // 2 - 1
        windows, owner = [], []
        for k, r in enumerate(requests):
            tokens = list(self.tokenizer.encode(r.args[0], add_special_tokens=False))
            for w in get_rolling_token_windows(tokens, self.prefix, window, 1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(windows, "loglikelihood_rolling")):
            totals[k] += logprob
        return totals

    def generate_until(self, requests: List[Any]) -> List[str]:
        progress = Progress("generate_until", len(requests), "requests", log=self.log)
        out = []
        for r in requests:
            context, options = r.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = self.max_tokens or options.get("max_gen_toks", DEFAULT_GEN_TOKENS)
            ids = self._encode(context) or [self.prefix]
            ids = ids[-max(1, self.context - budget - 1):]  # the newest context that fits
            out.append(self._generate(ids, until, budget))
            progress.step()
        return out

    def _generate(self, ids: List[int], until: List[str], budget: int) -> str:
        text, last = "", None
        for last in stream_generate(
            self.model, self.tokenizer, ids, max_tokens=budget, sampler=self.sampler,
            logits_processors=self.logits_processors, conf_threshold=self.conf_threshold,
            draft=self.draft,
        ):
            text += last.text
            cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
        if last is not None:
            c = self.counts
            c["generations"] += 1
            c["tokens"] += last.generation_tokens
            c["steps"] += last.steps
            c["token2_kept"] += last.token2_kept
        return text

    def figures(self) -> Dict[str, Any]:
        """PIPO's decoding figures over every generate_until request so far."""
        c = self.counts
        steps = max(c["steps"], 1)
        return {**c, "conf_threshold": self.conf_threshold, "draft": self.draft, "layout": self.layout,
                "keep_rate": c["token2_kept"] / steps if c["steps"] else None,
                "tokens_per_step": c["tokens"] / steps if c["steps"] else None}

    # -- chat templates, as mlx_lm.evaluate offers them

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "pipo")).replace("/", "__")

    def apply_chat_template(self, chat_history: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt, **self.chat_template_args,
        )
