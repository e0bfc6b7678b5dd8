"""Built-in requestcontrol plugins."""
