"""Command-line tools for elasticpg (``elasticpg-bench``: side-by-side benchmark against gloo)."""
