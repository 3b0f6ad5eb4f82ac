"""Data plane: moving framed bytes between ranks. Algorithms never see sockets."""
