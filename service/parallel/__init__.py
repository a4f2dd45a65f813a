"""Tower/replica parallelism over torch.distributed: layout, groups,
exchanges, gradient sync, batch replication and shard conversion. torch only."""
