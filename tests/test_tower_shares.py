"""Every tower reads its share: real gloo processes, 2 replicas x 2 towers, both decode modes.

Each tower reads only its own lane of the plan and prepares only its own
shares; the towers of a replica all-gather the same full batches, equal to
the replica's shares concatenated in tower order, and over all ranks every
image of the epoch is read exactly once (validation lanes of uneven length
included).
"""

from __future__ import annotations

import torch

from service.config import DataConfig
from service.data import epochs
from service.data.device_decode import ShareLoader
from service.data.epochs import Lane
from service.data.pipeline import iter_lane_local
from service.data.read import lane_keys
from service.parallel.batches import tower_batches
from service.parallel.layout import ParallelLayout
from service.parallel.local import run_on_processes
from service.train.build import rank_groups
from tests.data.shards import write_dataset

REPLICAS, TOWERS, SHARE_ROWS = 2, 2, 3


def _source(root: str, decode: str) -> epochs.DataSource:
    return epochs.open_source(DataConfig(root=root, resize_size=48, shuffle_seed=5), 32, REPLICAS, decode=decode)


def _tower_worker(rank, world_size, root, out_dir):
    groups = rank_groups(ParallelLayout.from_world_size(world_size, TOWERS))
    lane = Lane(groups.replica, REPLICAS, groups.tower, TOWERS)
    record = {}
    for decode in ("cpu", "device"):
        source = _source(root, decode)
        loader = ShareLoader(source, torch.device("cpu"))
        for split in ("train", "val"):
            prepared = []

            def prepare(share, split=split, prepared=prepared):
                prepared.append(len(share["label"]))
                return loader(share, split)

            shares = iter_lane_local(source, split, 1, lane, SHARE_ROWS)
            record[decode, split] = (list(tower_batches(shares, prepare, groups, torch.device("cpu"))), prepared)
    torch.save(record, f"{out_dir}/rank{rank}.pt")


def test_each_tower_prepares_its_share_and_the_replica_gathers_the_batch(tmp_path):
    root = str(tmp_path / "data")
    meta = write_dataset(root, num_train=41, num_val=11, shard_size=6)
    run_on_processes(_tower_worker, REPLICAS * TOWERS, root, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(REPLICAS * TOWERS)]
    for decode in ("cpu", "device"):
        source = _source(root, decode)
        loader = ShareLoader(source, torch.device("cpu"))
        for split in ("train", "val"):
            seen = []
            for replica in range(REPLICAS):
                lanes = [Lane(replica, REPLICAS, tower, TOWERS) for tower in range(TOWERS)]
                # What each tower must prepare: its own lane only, share by share.
                expected_shares = [[loader(s, split) for s in iter_lane_local(source, split, 1, lane, SHARE_ROWS)]
                                   for lane in lanes]
                towers = [ranks[replica * TOWERS + tower][decode, split] for tower in range(TOWERS)]
                for tower, (_, prepared) in enumerate(towers):
                    assert prepared == [len(s["label"]) for s in expected_shares[tower]], (decode, split, tower)
                batches = towers[0][0]
                assert len(batches) == max(len(shares) for shares in expected_shares)
                for step, batch in enumerate(batches):
                    parts = [shares[step] for shares in expected_shares if step < len(shares)]
                    for key in ("image", "label", "lighting"):
                        assert torch.equal(batch[key], torch.cat([p[key] for p in parts])), (decode, split, step, key)
                        for other, _ in towers[1:]:
                            assert torch.equal(other[step][key], batch[key])
                for lane in lanes:
                    seen += lane_keys(source, split, 1, lane, SHARE_ROWS)
            total = meta.num_train if split == "train" else meta.num_val
            assert len(seen) == len(set(seen))
            if split == "val":  # every validation image exactly once, uneven lanes included
                assert len(seen) == total
            else:  # whole shares only: at most one share per lane and the replica remainder left out
                assert total - len(seen) < REPLICAS * TOWERS * SHARE_ROWS + REPLICAS
