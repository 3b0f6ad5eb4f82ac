"""Control plane: everything ranks agree on through a c10d Store (endpoints, secret, views)."""
