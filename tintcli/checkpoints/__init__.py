"""Real checkpoint formats: reading them safely and converting them to tint's encoder."""
