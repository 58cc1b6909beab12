"""A worker process: its runtime (loop, pool, clients), the delivery core, the sweeper."""
