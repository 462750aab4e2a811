"""One module per ``specmq`` subcommand: flags, validation and output; the work itself lives in the layers below."""
