"""Local-only harness: the emulators (stack), the streaming demo and the closed
loop. Nothing in production imports it."""
