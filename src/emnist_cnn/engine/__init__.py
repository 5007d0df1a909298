"""What a command does: prepare data, train, evaluate, export, predict, import the reference."""
