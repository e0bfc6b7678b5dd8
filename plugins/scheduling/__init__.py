"""Built-in scheduling plugins."""
