"""Run under torchrun by test_data.py: each rank writes the sample keys its training loader yields.

torchrun --nproc-per-node 3 tests/epoch_keys.py s3://petal/datasets/synthetic CACHE_DIR OUT_DIR
"""

import json
import sys
from pathlib import Path

from training.data import SplitLoader, SplitStream
from training.distributed import World
from training.exit_codes import leave
from training.shards import read_index
from training.storage import Storage, parse_url

dataset, cache_dir, out_dir = parse_url(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
world = World.from_env()
storage = Storage.from_env()
stream = SplitStream(storage, dataset, read_index(storage, dataset), ["train"], cache_dir)
seen = {}
batches = SplitLoader(stream, 32, seed=7, augment=True, batch_size=5, workers=2, pin_memory=False)
for epoch in (1, 2):
    numbers = stream.assignment(7, epoch, world.world_size, shuffle=True)[world.rank]
    seen[epoch] = [key for _, _, keys in batches.for_epoch(epoch, numbers) for key in keys]
batches.close()
(out_dir / f"rank{world.rank}.json").write_text(json.dumps(seen))
leave(0)
