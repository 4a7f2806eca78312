"""Stage 2 for `ray job submit --working-dir . -- python jobs/train.py --config configs/X.yaml [--set k=v]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from t3s_ray.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
