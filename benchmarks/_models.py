"""Random encoders of real shapes for benchmarks, built fast (no Hugging Face init pass)."""

from __future__ import annotations

import torch

SHAPES = {
    # mmBERT-small: 22 layers, hidden 384, intermediate 1152, 6 heads, vocab 256000
    "mmbert-small": dict(hidden_size=384, num_hidden_layers=22, num_attention_heads=6, intermediate_size=1152),
    # mmBERT-base = DiffutronLM-0.3B: 22 layers, hidden 768, intermediate 1152, 12 heads, vocab 256000
    "mmbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
    # a few layers of mmBERT's layout (global attention every third layer), for CPU smoke runs of benchmarks
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96),
}


def random_mmbert(shape: str | dict, *, vocab_size: int = 256000, max_position_embeddings: int = 8192, seed: int = 0,
                  device: str | torch.device = "cpu"):
    """A ModernBertForMaskedLM with random N(0, 0.02) weights, eval mode; ``shape`` is a name of
    ``SHAPES`` or a mapping of hidden_size, num_hidden_layers, num_attention_heads, intermediate_size.
    Built and filled on ``device`` (a GPU fills mmBERT-base's 307M weights in milliseconds; its
    random values differ from a CPU draw with the same seed)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    from transformers.initialization import no_init_weights

    config = ModernBertConfig(
        vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, local_attention=128,
        global_attn_every_n_layers=3, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=1,
        sep_token_id=1, **(SHAPES[shape] if isinstance(shape, str) else shape),
    )
    device = torch.device(device)
    with no_init_weights(), device:
        model = ModernBertForMaskedLM(config)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    model.tie_weights()
    return model.eval()


MASK_ID = 4
EOS_ID = 1
