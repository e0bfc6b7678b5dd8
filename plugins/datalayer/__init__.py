"""Built-in datalayer plugins."""
