"""``python -m lussray.train``: stage 1, PASS pretraining (the same as ``lussray train``).

    ray job submit --working-dir . -- python -m lussray.train --dataset imagenet-s919 \\
        --data s3://bucket/shards --run s3://bucket/runs/s919
"""

import sys

from lussray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
