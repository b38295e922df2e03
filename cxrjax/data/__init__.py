"""Data layer: metadata -> canonical table -> pair groups -> sharded records -> pipeline."""
