"""`vgs eval`: the benchmark registry and loaders (`datasets`), the resumable runner
(`runner`) and the tables and plots (`report`)."""
