"""The admin API, its auth, OpenAPI, rollout actions, health and the console."""
