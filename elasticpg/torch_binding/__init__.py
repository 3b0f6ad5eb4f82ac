"""The PyTorch binding: a ProcessGroup subclass, its Work objects, and backend registration."""
