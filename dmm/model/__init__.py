"""Decision MetaMamba: DSM, selective scan, modified Mamba, the policy and its inference."""

from dmm.model.checkpoint import Policy, PolicyVersion, load_policy, publish_policy
from dmm.model.config import DMMConfig, InferenceMode, PolicyMeta
from dmm.model.graphs import GraphedRunner, make_runner
from dmm.model.inference import PolicyRunner
from dmm.model.policy import PolicyNetwork

__all__ = [
    "DMMConfig",
    "GraphedRunner",
    "InferenceMode",
    "Policy",
    "PolicyMeta",
    "PolicyNetwork",
    "PolicyRunner",
    "PolicyVersion",
    "load_policy",
    "make_runner",
    "publish_policy",
]
