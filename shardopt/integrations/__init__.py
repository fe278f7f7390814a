"""Where a training framework needs more than swapping the optimizer line: one module per framework,
each over the framework's own hooks, importing it only when used (the framework is an optional extra)."""
