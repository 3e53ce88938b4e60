"""Operator commands: the bus is the only way into a running service (it opens no port),
so these read it and act on it: `tail`, `dlq list|show|redrive`, `replay`. Each command is
one module with `register(commands)` (its arguments) and `run(settings, args)`."""
