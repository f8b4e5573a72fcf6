"""The `snapship` command line: parses arguments, builds concrete objects, prints results."""
