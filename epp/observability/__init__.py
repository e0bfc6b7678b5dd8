"""The EPP's own metrics and logging."""
