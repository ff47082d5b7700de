"""The build pipeline: step interface and registry, content-addressed step cache, plan and runner."""
