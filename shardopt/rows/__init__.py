"""SparseAdam, sharded by rows of its sparse tables (``SparseRowOptimizer``)."""
