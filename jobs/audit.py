"""Ray Jobs entrypoint of the audit.

    ray job submit --working-dir . -- python jobs/audit.py \
        --model M.keras --train TRAIN --test TEST --out OUT [flags of `distributed-influence audit`]

Inside a Ray job, ``RAY_ADDRESS`` points at the cluster, so the audit joins it instead of
starting Ray locally. Logging is on, so ``ray job logs`` shows every stage.
"""

import os
import sys

# With `--working-dir .` the project is uploaded but not installed: make the package importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_influence.cli import run  # noqa: E402


def parse_args(argv):
    """The audit's own flags, passed through unchanged (see `distributed-influence audit --help`)."""
    return ["--verbose", "audit", *argv]


if __name__ == "__main__":
    sys.exit(run(parse_args(sys.argv[1:])))
