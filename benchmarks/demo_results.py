"""Run the demo (what ``make demo`` runs) and commit its tables: benchmarks/results/demo-cpu.json and .md, with
the machine it ran on. The README quotes the personalization gain from these files.

    python benchmarks/demo_results.py [--out runs/demo-results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results

from harmonizer_fast.demo import markdown, run_demo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo-results"), help="the demo's run and evaluation")
    args = p.parse_args()
    result = run_demo(args.out, progress=False)
    payload = {"benchmark": "demo-cpu", "command": "python benchmarks/demo_results.py", "machine": machine_info(),
               **result}  # fmt: skip
    m = payload["machine"]
    md = (f"# The demo: synthetic data, small config, both phases\n\n`python benchmarks/demo_results.py` (the same as "
          f"`harmonizer-fast demo`) on {m['date']}: {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}; "
          f"{result['epochs'][0]} + {result['epochs'][1]} epochs, {result['seconds']:.0f} s in all.\n\n"
          + markdown(result))  # fmt: skip
    write_results("demo-cpu", payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
