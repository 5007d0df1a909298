"""What a command does besides training: evaluate, compare, export, predict, import the reference."""
