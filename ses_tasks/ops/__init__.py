"""Operating it: the CLI, progress, metrics, logs, observers, direct sends."""
