"""Compatibility layers that expose elasticpg under other libraries' Python names."""
