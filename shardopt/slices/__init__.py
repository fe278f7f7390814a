"""LBFGS, sharded by slices of its history vectors (``ShardedLBFGS``)."""
