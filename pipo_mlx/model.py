"""The PIPO model: mlx-lm's Qwen3.5 text model plus compressor, MTP and confidence heads.

The backbone is mlx-lm's own `TextModel`, so its parameters keep mlx-lm's names
(`model.*`, `lm_head.*`) and its cache classes, quantization and LoRA tooling
apply unchanged. The heads sit beside it under their checkpoint names.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3_5 import TextModel, TextModelArgs

from .heads import Compressor, ConfidenceHead, MTPHead

QWEN35_PAD_TOKEN_ID = 248044
HEAD_PREFIXES = ("compressor.", "mtp.", "confidence_head.")


@dataclass
class ModelArgs(TextModelArgs):
    compressor_type: str = "mlp"
    mtp_num_hidden_layers: int = 1
    pad_token_id: int = QWEN35_PAD_TOKEN_ID

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
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


def _is_norm_weight(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] == "weight" and "norm" in parts[-2]


class Model(TextModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.compressor = Compressor(args.hidden_size, args.compressor_type)
        self.mtp = MTPHead(args, args.mtp_num_hidden_layers)
        self.confidence_head = ConfidenceHead(args.hidden_size, args.rms_norm_eps)

    # -- building blocks, shared by the teacher-forced pass, the generator and training

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

    def make_cache(self) -> List[Any]:
        return super().make_cache() + [KVCache() for _ in self.mtp.layers]

    def split_cache(
        self, cache: Optional[List[Any]]
    ) -> Tuple[Optional[List[Any]], Optional[List[Any]]]:
        if cache is None:
            return None, None
        n = len(self.layers)
        return cache[:n], cache[n:]

    # -- checkpoints

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map an HF-layout PIPO state dict (either key layout) to this module's names.

        Already converted weights pass through unchanged: like mlx-lm, we tell an
        HF checkpoint by its unconverted conv1d layout.
        """
        from_hf = any(
            "conv1d.weight" in k and v.shape[-1] != 1 for k, v in weights.items()
        )
        heads, backbone = {}, {}
        for k, v in weights.items():
            if k.startswith(HEAD_PREFIXES):
                heads[k] = v
            elif k.startswith(("model.visual", "vision_tower")):
                continue
            else:
                backbone[k.replace("model.language_model.", "model.", 1)] = v
        backbone = super().sanitize(backbone)
        if from_hf:
            # HF Qwen3.5 norms scale by (1 + w); MLX's RMSNorm scales by w.
            heads = {k: v + 1.0 if _is_norm_weight(k) else v for k, v in heads.items()}
        return {**backbone, **heads}
