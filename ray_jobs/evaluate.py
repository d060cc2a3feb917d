"""Entry point for `ray job submit -- python ray_jobs/evaluate.py --run RUN [...]`: the same
as `mmcl eval`, joined to the cluster the job runs on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see ray_jobs/pretrain.py

from mmcl.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--address" not in argv and "--no-ray" not in argv:
        argv += ["--address", "auto"]
    sys.exit(main(["eval", *argv]))
