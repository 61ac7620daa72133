"""Decision MetaMamba: DSM, selective scan, modified Mamba, the policy and its inference."""

from dmm.model.checkpoint import LoadedPolicy, Policy, load_policy, publish_policy
from dmm.model.config import DMMConfig, InferenceMode, PolicyMeta
from dmm.model.inference import PolicyRunner
from dmm.model.policy import DMMPolicy

__all__ = [
    "DMMConfig",
    "DMMPolicy",
    "InferenceMode",
    "LoadedPolicy",
    "Policy",
    "PolicyMeta",
    "PolicyRunner",
    "load_policy",
    "publish_policy",
]
