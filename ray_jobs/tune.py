"""Entry point for `ray job submit -- python ray_jobs/tune.py --config FILE [--set k=v]
[--strategy sweep|sample-opt]`.

Thin on purpose: the same parsing and the same functions as `mmcl tune`, joined to the
cluster the job runs on (address "auto").
"""

import sys
from pathlib import Path

# With `--working-dir .` the repository is this script's parent; make `mmcl` importable from it
# even where the cluster's Python does not have mmcl installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcl.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--address" not in argv:
        argv += ["--address", "auto"]
    sys.exit(main(["tune", *argv]))
