"""Client of the policy service (torch-free): ``PolicyClient(target).rollout(env=..., episodes=...)``."""

from dmm.client.policy_client import ModelDescription, PolicyClient, PolicyServiceError, RolloutResult

__all__ = ["ModelDescription", "PolicyClient", "PolicyServiceError", "RolloutResult"]
