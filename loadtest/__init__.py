"""Load tests (Locust against the served endpoints) and the benchmark of served vs raw model."""
