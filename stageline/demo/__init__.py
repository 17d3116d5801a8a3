"""The embedded demo: a synthetic card-fraud world and its trained model."""
