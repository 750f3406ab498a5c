"""The command line every peer decode runner takes (bench/decode.py and bench/speed.py pass it)."""

from __future__ import annotations

import argparse


def decode_args(model_flag: str, variants: list[str] | None = None) -> argparse.Namespace:
    """`--variant`, the model (`model_flag`: --model or --gguf), token counts, prompt ids and result path."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=variants)
    ap.add_argument(model_flag, required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--result", required=True)
    return ap.parse_args()
