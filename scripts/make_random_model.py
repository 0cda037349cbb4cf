"""Save a randomly initialised R-4B (``rvl``) of a given size as a model directory that ``model.path`` can name.

    python scripts/make_random_model.py --out runs/gpu/model-1b              # ~1.2B parameters, bf16 safetensors
    python scripts/make_random_model.py --out runs/gpu/model --preset small  # ~84M: the GPU checks' runs
    python scripts/make_random_model.py --out /tmp/m --preset tiny           # the embedded tiny model's shape

R-4B's architecture (SigLIP tower, MLP projector, Qwen3 language model) at the preset's sizes, over the tiny
tokenizer shipped with r4b (no download; its special tokens and ``<image>`` id are what the model is built
with). ``1b``: a Qwen3-style language model (hidden 2048, 10 layers, 16 query / 8 key-value heads of 128, SwiGLU
6144) with Qwen3's 151,936-row vocabulary (the tokenizer knows only its first rows: sampled ids beyond it decode
to nothing, so rollouts still run), and a SigLIP-so400m-style tower cut to 4 layers (384-pixel tiles of
729 patches, 16 heads of 72). ``small`` (the GPU checks' training runs, configs/gpu/): the same attention shapes
(Qwen3-0.6B's 16 query / 8 key-value heads of 128 over hidden 1024, the SigLIP tower's 16 heads of 72 and its
tiles) at 2 language layers, 1 vision layer and a 16,384-row vocabulary: ~84M parameters, so its checkpoint (fp32
masters and AdamW's two moments, 12 bytes a parameter) is ~1 GB where 1b's is ~15 GB. The shapes are real, the
weights are not; they depend only on ``--seed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

PRESETS = {
    "1b": {
        "text": dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=10, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1_000_000.0,
        ),
        "vision": dict(
            image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=4,
            num_attention_heads=16,
        ),
        "grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
    },
    "small": {
        "text": dict(
            vocab_size=16384, hidden_size=1024, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1_000_000.0,
        ),
        "vision": dict(
            image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
            num_attention_heads=16,
        ),
        "grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
    },
    "tiny": {"text": {}, "vision": {}, "grid_pinpoints": None},
}  # fmt: skip


def build_config(preset: str):
    """The tiny R-4B's config (the tokenizer's special ids) with the preset's language model and vision tower."""
    from transformers import Qwen3Config, SiglipVisionConfig

    from r4b.models import tiny_r4b_config

    config = tiny_r4b_config()
    sizes = PRESETS[preset]
    if sizes["text"]:  # built afresh, so that per-layer fields (layer_types) match the layer count
        text = config.text_config.to_dict()
        for key in ("layer_types", "architectures", "model_type", "transformers_version"):
            text.pop(key, None)
        config.text_config = Qwen3Config(**{**text, **sizes["text"]})
    if sizes["vision"]:
        vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("model_type",)}
        vision.pop("transformers_version", None)
        config.vision_config = SiglipVisionConfig(**{**vision, **sizes["vision"]})
    if sizes["grid_pinpoints"]:
        config.image_grid_pinpoints = [list(p) for p in sizes["grid_pinpoints"]]
    return config


def build_model(preset: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype=torch.bfloat16):
    """The randomly initialised model on ``device`` (``"meta"``: shapes only) in ``dtype``."""
    from r4b.models.r4b_model import RForConditionalGeneration

    config = build_config(preset)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        model = RForConditionalGeneration(config)
    return model.to(dtype).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="of the saved weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="to initialise on")
    args = parser.parse_args(argv)

    from r4b.models.image_processing import RImageProcessor
    from r4b.models.loading import save_model
    from r4b.models.tokenizer import load_tokenizer

    model = build_model(args.preset, seed=args.seed, device=args.device, dtype=getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    save_model(model.cpu(), args.out, load_tokenizer(), RImageProcessor.from_config(model.config))
    print(f"wrote {args.out}: random R-4B '{args.preset}', {params / 1e6:.1f}M parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
