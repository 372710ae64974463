"""One module per CLI subcommand (see tilecrate.cli)."""
