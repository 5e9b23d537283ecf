"""Train the sample persona adapters in samples/adapters/ from samples/personas/*.jsonl.

    python samples/train_personas.py            # CUDA if present (seconds), else CPU (slow: minutes each)

The committed adapters were made with exactly this script (see samples/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from daemon.engines.text.default_model import ensure_default_text_model  # noqa: E402
from daemon.train import TrainConfig, train_adapter  # noqa: E402

PERSONAS = {"pirate": "pirate_quartermaster", "elf": "elven_archivist", "blacksmith": "grumpy_blacksmith"}
CONFIG = TrainConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), steps=150, lr=1e-3,
                     batch_size=16, max_length=128, seed=0, save_dtype="bfloat16")


def main() -> int:
    base = ensure_default_text_model()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "adapters"
    for name, data in PERSONAS.items():
        folder = train_adapter(base, HERE / "personas" / f"{data}.jsonl", out, name, CONFIG)
        print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
