"""Application layer: commands and tools built on the library (CLI commands, the AOT compile tool)."""
