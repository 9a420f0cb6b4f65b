"""The `duopool` command line. One module per subcommand, each with `register(subparsers)`."""
