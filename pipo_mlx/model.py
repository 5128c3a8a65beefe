"""The PIPO model: a backbone's text model plus compressor, MTP and confidence heads.

`PipoModel` is mixed into a backbone's own mlx-lm text model class (see
`backbones/`), so the backbone keeps mlx-lm's parameter names (`model.*`,
`lm_head.*`), caches, quantization and LoRA tooling; the heads sit beside it
under their checkpoint names (docs/design.md §2).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .errors import PipoError
from .heads import Compressor, ConfidenceHead, MTPHead
from .kv_cache import KEEP_PAIRS, rotating_cache

HEAD_PREFIXES = ("compressor.", "mtp.", "confidence_head.")


@dataclass
class PipoArgs:
    """The PIPO fields, mixed into a backbone's argument dataclass."""

    compressor_type: str = "mlp"
    mtp_num_hidden_layers: int = 1
    # None until known: `model_io.load` fills it from the tokenizer when the
    # config has none (docs/design.md §3).
    pad_token_id: Optional[int] = None
    # The gate threshold this model was tuned for, used when a caller gives
    # none; None: the paper's 0.95 (docs/design.md §5).
    conf_threshold: Optional[float] = None
    # The extra time of a drafting step over a plain one, as a fraction of the
    # plain step, measured on the user's machine by `pipo_mlx.calibrate`; None:
    # estimated from the weights each step reads (drafting.draft_cost).
    draft_cost: Optional[float] = None
    # Where the base model came from (a path or hub id), recorded by conversion
    # and training so that the benchmark and calibration can find it.
    base_model: Optional[str] = None

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "PipoArgs":
        # A converted config is the backbone's text config with the PIPO fields
        # in a `pipo` section of their own.
        flat = {k: v for k, v in params.items() if k != "pipo"}
        flat.update(params.get("pipo", {}))
        return super().from_dict(flat)


@dataclass
class PipoOutput:
    logits: mx.array  # [B, L, V]: position i predicts t_{2i+2}
    mtp_logits: mx.array  # [B, L-1, V]: position i predicts t_{2i+3}
    confidence: mx.array  # [B, L-1]: raw keep logits for those drafts
    hidden: mx.array  # [B, L, H]: backbone output after the final norm
    mtp_hidden: mx.array  # [B, L-1, H]: MTP output after its norm


class PipoModel(nn.Module):
    """Mixed in before a backbone's text model class, which provides `model`
    (with `embed_tokens`), `lm_head` when untied, `layers` and `make_cache`."""

    # What the training forward computes in; None (a model not set up for
    # training): the weights' own dtype (adapters.setup_trainable, docs/design.md §6).
    compute_dtype: Optional[mx.Dtype] = None

    def __init__(self, args: PipoArgs):
        super().__init__(args)
        self.compressor = Compressor(args.hidden_size, args.compressor_type)
        self.mtp = MTPHead(
            args, [self.mtp_layer(args) for _ in range(args.mtp_num_hidden_layers)]
        )
        self.confidence_head = ConfidenceHead(args.hidden_size, args.rms_norm_eps)

    @staticmethod
    def mtp_layer(args: Any) -> nn.Module:
        """One decoder layer of the MTP head; each backbone says which kind."""
        raise NotImplementedError

    @staticmethod
    def cache_keys_values(layer: nn.Module, x: mx.array, cache: Any) -> None:
        """Append what `layer`'s attention would cache for inputs `x`, and nothing else."""
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        pad = self.args.pad_token_id
        if pad is None:
            raise PipoError(
                "the model has no PAD token id: load it with pipo_mlx.load, which reads "
                "it from the tokenizer, or set model.args.pad_token_id"
            )
        return pad

    # -- building blocks, shared by the teacher-forced pass, the decoder and training

    def embed(self, ids: mx.array) -> mx.array:
        return self.model.embed_tokens(ids)

    def lm_logits(self, x: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(x)
        return self.lm_head(x)

    def compress(self, ids: mx.array) -> mx.array:
        """[B, 2n] token ids -> [B, n, H] backbone inputs, one per pair."""
        B, T = ids.shape
        e = self.embed(ids)
        return self.compressor(e.reshape(B, T // 2, 2 * e.shape[-1]))

    def hidden(self, ids: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        """Backbone states (after the final norm) for the pairs of `ids`."""
        return self.model(None, cache=cache, input_embeddings=self.compress(ids))

    def draft(
        self, token1: mx.array, hidden: mx.array, cache: Optional[List[Any]] = None
    ) -> mx.array:
        """MTP hidden state m from token1 ids [B, n] and backbone states [B, n, H]."""
        return self.mtp(self.embed(token1), hidden, cache)

    def fill_mtp_cache(self, token1: mx.array, hidden: mx.array, cache: List[Any]) -> None:
        """The MTP cache entries of positions whose drafts nobody reads (the prompt's,
        and those of steps that skipped the MTP head): all layers but the last run
        whole, the last only as far as its keys and values, about a fifth of its
        weights (docs/design.md §5)."""
        if hidden.shape[1] == 0:
            return
        x = self.mtp.inputs(self.embed(token1), hidden)
        *inner, last = self.mtp.layers
        if inner:
            mask = create_attention_mask(x, cache[0])
            for layer, c in zip(inner, cache):
                x = layer(x, mask=mask, cache=c)
        self.cache_keys_values(last, x, cache[-1])

    def confidence(self, hidden: mx.array, mtp_hidden: mx.array) -> mx.array:
        return self.confidence_head(hidden, mtp_hidden)

    # -- teacher-forced pass

    def __call__(self, input_ids: mx.array, cache: Optional[List[Any]] = None) -> PipoOutput:
        if input_ids.shape[1] % 2:
            raise ValueError(
                f"PIPO reads tokens in pairs; got an odd length {input_ids.shape[1]}"
            )
        backbone_cache, mtp_cache = self.split_cache(cache)
        h = self.hidden(input_ids, backbone_cache)
        m = self.draft(input_ids[:, 2::2], h[:, :-1], mtp_cache)
        return PipoOutput(
            logits=self.lm_logits(h),
            mtp_logits=self.lm_logits(m),
            confidence=self.confidence(h[:, :-1], m),
            hidden=h,
            mtp_hidden=m,
        )

    # -- caches: the backbone's (mlx-lm's kinds) followed by one KVCache per MTP layer

    def make_cache(self, max_kv_size: Optional[int] = None, keep: int = KEEP_PAIRS) -> List[Any]:
        """`max_kv_size` (tokens): every attention cache, the MTP's too, rotates over
        that many tokens' pairs, the first `keep` pairs kept (docs/memory.md)."""
        caches = super().make_cache() + [KVCache() for _ in self.mtp.layers]
        if max_kv_size is None:
            return caches
        return [rotating_cache(max_kv_size, keep) if isinstance(c, KVCache) else c for c in caches]

    def split_cache(
        self, cache: Optional[List[Any]]
    ) -> Tuple[Optional[List[Any]], Optional[List[Any]]]:
        if cache is None:
            return None, None
        n = len(self.layers)
        return cache[:n], cache[n:]

    # -- checkpoints

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """The backbone's own sanitize for its keys; head keys pass through."""
        heads = {k: v for k, v in weights.items() if k.startswith(HEAD_PREFIXES)}
        backbone = {k: v for k, v in weights.items() if not k.startswith(HEAD_PREFIXES)}
        return {**super().sanitize(backbone), **heads}
