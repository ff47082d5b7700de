"""Loading and validating targets, profiles and build plans; the only place that reads the environment."""
