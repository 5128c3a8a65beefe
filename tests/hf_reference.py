"""The Hugging Face side of the tests, independent of pipo_mlx.

`transformers` provides the Qwen3.5 backbone (and the MTP's decoder layer, which
is a Qwen3.5 full-attention layer). The compressor, the MTP wiring and the
confidence head are written here in PyTorch from docs/design.md §2, in the HF
convention (RMSNorm scales by 1 + w). Checkpoints are written in the real HF
layout, tokenizer included.
"""

import json
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5DecoderLayer,
    Qwen3_5TextRotaryEmbedding,
)

PAD, EOS = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 20


def tiny_config(**overrides) -> Qwen3_5TextConfig:
    params = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"] * 2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    params.update(overrides)
    config = Qwen3_5TextConfig(**params)
    config._attn_implementation = "sdpa"  # causal without an explicit mask
    return config


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[PAD, EOS, "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(folder)
    return wrapped


class RefRMSNorm(tnn.Module):
    """Qwen3.5's RMSNorm: normalize(x) * (1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = tnn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1.0 + self.weight)


class RefCompressor(tnn.Module):
    def __init__(self, h: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.linear = tnn.Linear(2 * h, h)
        else:
            self.mlp = tnn.Sequential(tnn.Linear(2 * h, 2 * h), tnn.SiLU(), tnn.Linear(2 * h, h))

    def forward(self, pairs):
        return self.linear(pairs) if self.kind == "linear" else self.mlp(pairs)


class RefMTP(tnn.Module):
    def __init__(self, config: Qwen3_5TextConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = RefRMSNorm(h, eps)
        self.pre_fc_norm_hidden = RefRMSNorm(h, eps)
        self.fc = tnn.Linear(2 * h, h, bias=False)
        full = config.layer_types.index("full_attention")
        self.layers = tnn.ModuleList([Qwen3_5DecoderLayer(config, full)])
        self.norm = RefRMSNorm(h, eps)
        self.rotary = Qwen3_5TextRotaryEmbedding(config)

    def forward(self, emb, hidden):
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(hidden)], -1))
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        pe = self.rotary(x, pos)
        for layer in self.layers:
            x = layer(x, position_embeddings=pe, attention_mask=None)
        return self.norm(x)


class RefConfidence(tnn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.norm = RefRMSNorm(2 * h, eps)
        self.fc1 = tnn.Linear(2 * h, h, bias=False)
        self.fc2 = tnn.Linear(h, 1, bias=False)

    def forward(self, hidden, mtp_hidden):
        x = self.norm(torch.cat([hidden, mtp_hidden], -1))
        return self.fc2(F.silu(self.fc1(x))).squeeze(-1)


class RefPIPO(tnn.Module):
    """HF Qwen3.5 backbone + PIPO heads written from the spec."""

    def __init__(self, config: Qwen3_5TextConfig, compressor: str = "mlp", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hf_config = config  # not `config`: PEFT would take us for a transformers model
        # The HF causal LM's parts are held directly, so state-dict keys (and
        # PEFT adapter keys) come out in the checkpoint layout: model.*, lm_head.*
        causal_lm = Qwen3_5ForCausalLM(config).float()
        self.model, self.lm_head = causal_lm.model, causal_lm.lm_head
        h = config.hidden_size
        self.compressor = RefCompressor(h, compressor)
        self.mtp = RefMTP(config)
        self.confidence_head = RefConfidence(h, config.rms_norm_eps)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    # Non-zero norms, so the +1 rule is exercised everywhere.
                    p.copy_(torch.randn_like(p) * 0.3)
                elif p.ndim == 2:
                    p.copy_(torch.randn_like(p) * 0.08)
                elif name.endswith("bias"):
                    p.copy_(torch.randn_like(p) * 0.05)
        self.eval()

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> Dict[str, np.ndarray]:
        B, T = ids.shape
        pairs = self.embed(ids).reshape(B, T // 2, -1)  # [e_{2i} ; e_{2i+1}]
        h = self.model(inputs_embeds=self.compressor(pairs)).last_hidden_state
        m = self.mtp(self.embed(ids[:, 2::2]), h[:, :-1])
        out = {
            "hidden": h,
            "logits": self.lm_head(h),
            "mtp_logits": self.lm_head(m),
            "confidence": self.confidence_head(h[:, :-1], m),
        }
        return {k: v.float().numpy() for k, v in out.items()}

    def hf_state_dict(self, layout: str = "text") -> Dict[str, torch.Tensor]:
        """Merged-checkpoint keys: `model.*` or `model.language_model.*`, plus heads."""
        sd = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight" and self.hf_config.tie_word_embeddings:
                continue
            if layout == "multimodal" and k.startswith("model."):
                k = "model.language_model." + k[len("model."):]
            sd[k] = v.detach().contiguous().clone()
        return sd

    @torch.no_grad()
    def backbone_logits(self, ids: torch.Tensor) -> np.ndarray:
        """Plain Qwen3.5 next-token logits (no pairing), for backbone parity."""
        return self.lm_head(self.model(input_ids=ids).last_hidden_state).numpy()


def hf_config_dict(config: Qwen3_5TextConfig, nested: bool = False, **extra) -> dict:
    text = config.to_dict()
    text.update(extra)
    if not nested:
        return text
    text["model_type"] = "qwen3_5_text"
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": text,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def write_checkpoint(
    folder: Path,
    state_dict: Dict[str, torch.Tensor],
    config: dict,
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state_dict)
    if shards == 1:
        save_file({k: state_dict[k] for k in keys}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state_dict[k] for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        with open(folder / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer:
        make_tokenizer(folder)
    return folder


def random_ids(batch: int, length: int, vocab: int = 300, seed: int = 0, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, vocab, size=(batch, length))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def to_numpy(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32))

