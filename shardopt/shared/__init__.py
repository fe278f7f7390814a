"""What every scheme shares: the ShardedOptimizer base, param-group checks, the hooks on backward and
DDP, the step between reduction and update (clipping, GradScaler), and torch.optim's state format."""
