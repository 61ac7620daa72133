"""Decision MetaMamba: offline-RL sequence policies, their store, trainer and gRPC service.

Importing ``dmm`` is cheap and torch-free: the client side (``dmm.client``, ``dmm.envs``,
``dmm.v1``) must work without torch installed.
"""

__version__ = "0.1.0"
