"""The live state of one group in one process: view, sequence counter, links, mode."""
