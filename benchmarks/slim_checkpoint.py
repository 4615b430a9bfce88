"""A checkpoint's weights alone, for carrying a big run home: `python benchmarks/slim_checkpoint.py last.pt out.pt`.

Keeps what `reslab eval` and `reslab predict` read (the weights the run evaluated, the EMA's when it kept one, and
the model's and run's description), not the optimiser's state or the history a resume needs: WRN-40-4's last.pt is ~3x this.
"""

import sys

from reslab.engine import checkpoint


def slim(src: str, dst: str) -> None:
    state = checkpoint.load(src)
    weights = checkpoint.evaluated_weights(state)
    kept = {"model": {k: v.cpu() for k, v in weights.items()}, "ema": None}
    checkpoint.save({**kept, "meta": state["meta"], "config": state["config"]}, dst)


if __name__ == "__main__":
    slim(*sys.argv[1:3])
    print(f"wrote {sys.argv[2]}")
