"""Multi-LoRA text throughput benchmark; the same as `loraloom bench text` (see daemon/bench_text.py).

    python benchmarks/bench_text.py --model default --streams 8 --new-tokens 64 --json benchmarks/results/text_cpu.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.bench_text import main

sys.exit(main())
