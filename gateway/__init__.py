"""canary-gateway: a traffic-splitting and canary-rollout gateway for ML model servers."""

__version__ = "0.1.0"
