"""What a group handle counts (counters.py) and how it is exported (prometheus.py)."""
