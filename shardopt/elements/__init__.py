"""The element-wise algorithms, sharded by element ranges of flat buffers (``ElementOptimizer``)."""
