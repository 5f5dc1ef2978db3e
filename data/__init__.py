"""Text sources and the Grain input pipeline."""
