"""The DMM policy: per-modality embeddings, a stack of DMM blocks and a tanh action head.

Tokens per timestep t are (rtg_t, s_t, a_t), so a context of K steps is 3K tokens. By default a
learned embedding of the episode step t is added to all three (``timestep_embedding``, as in DT;
False leaves it out as the paper does, but then DMM cannot tell "rtg r at step t" and follows the
target far less). There is no positional embedding: the scan orders the tokens. The action for
step t is read at the s_t token, which (causally) has seen rtg_t and s_t but not a_t.

``architecture="dt"`` swaps the blocks for GPT blocks, so the Decision Transformer baseline shares
tokens, timestep embedding, head, padding, training and serving with DMM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmm.model.block import BlockState, DMMBlock
from dmm.model.config import DMMConfig
from dmm.model.gpt_block import GPTBlock
from dmm.model.mamba import ModifiedMamba
from dmm.model.scan import Backend

TOKENS_PER_STEP = 3


class PolicyNetwork(nn.Module):
    def __init__(self, config: DMMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed_rtg = nn.Linear(1, d)
        self.embed_state = nn.Linear(config.state_dim, d)
        self.embed_action = nn.Linear(config.act_dim, d)
        self.embed_ln = nn.LayerNorm(d)
        self.embed_drop = nn.Dropout(config.dropout)
        block = GPTBlock if config.architecture == "dt" else DMMBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.n_layer))
        self.embed_timestep = nn.Embedding(config.max_ep_len, d) if config.timestep_embedding else None
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.act_dim)
        if self.embed_timestep is not None:
            nn.init.normal_(self.embed_timestep.weight, std=0.02)
        # The embeddings keep PyTorch's default init, biases included: every token goes through
        # LayerNorm, and LN(w * rtg) with a zero bias is the same vector for every positive rtg
        # (LN(W s) likewise forgets |s|), so a zero-bias init would hide the return-to-go.

    def set_scan_backend(self, backend: Backend | None) -> None:
        """Pin this policy's scans to ``backend`` (None: follow the process default)."""
        for module in self.modules():
            if isinstance(module, ModifiedMamba):
                module.scan_backend = backend

    def _tokens(self, rtg: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor | None) -> Tensor:
        """Interleave (rtg_t, s_t, a_t) embeddings: [b, T, *] -> [b, 3T, d]."""
        b, T = states.shape[:2]
        stacked = torch.stack(
            [self.embed_rtg(rtg), self.embed_state(states), self.embed_action(actions)], dim=2
        )
        if self.embed_timestep is not None:
            stacked = stacked + self._timestep_embedding(timesteps).unsqueeze(2)
        return self.embed_drop(self.embed_ln(stacked.reshape(b, TOKENS_PER_STEP * T, -1)))

    def _timestep_embedding(self, timesteps: Tensor | None) -> Tensor:
        """Embeddings of episode steps (call only when ``embed_timestep`` exists)."""
        if timesteps is None:
            raise ValueError("this policy embeds the episode timestep: pass the timestep of every step")
        return self.embed_timestep(timesteps.clamp(0, self.config.max_ep_len - 1))

    def _blocks(
        self, x: Tensor, mask: Tensor | None, state: list[BlockState] | None
    ) -> tuple[Tensor, list[BlockState | None]]:
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, mask, None if state is None else state[i])
            new_state.append(s)
        return x, new_state

    def _action(self, h: Tensor) -> Tensor:
        return torch.tanh(self.head(self.ln_f(h)))

    def forward(
        self,
        rtg: Tensor,
        states: Tensor,
        actions: Tensor,
        mask: Tensor | None = None,
        timesteps: Tensor | None = None,
    ) -> Tensor:
        """Predict a_t for every step of a (left-padded) window.

        rtg [b, T, 1] (scaled), states [b, T, S] (normalized), actions [b, T, A], mask [b, T] with
        False at padding; timesteps [b, T] (episode step of each position) only for DT. Returns
        actions [b, T, A]; rows at padding are meaningless.
        """
        return self.forward_carried(rtg, states, actions, mask, timesteps, None)[0]

    def forward_carried(
        self,
        rtg: Tensor,
        states: Tensor,
        actions: Tensor,
        mask: Tensor | None,
        timesteps: Tensor | None,
        state: list[BlockState] | None,
    ) -> tuple[Tensor, list[BlockState | None]]:
        """:meth:`forward` over a chunk that continues a sequence: ``state`` is the recurrent state
        after the steps before it (None: the chunk starts the sequence) and the state after the chunk
        is returned with the actions, so a long sequence runs chunk by chunk with the same result as in
        one piece, and as recurrent inference step by step. Training carries it from update to update
        (``TrainConfig.episode_fraction``). Padding in a continued chunk goes at its end (right).
        """
        token_mask = None if mask is None else mask.repeat_interleave(TOKENS_PER_STEP, dim=1)
        h, new_state = self._blocks(self._tokens(rtg, states, actions, timesteps), token_mask, state)
        return self._action(h[:, 1::TOKENS_PER_STEP]), new_state

    def state_before_last_action(
        self, rtg: Tensor, states: Tensor, actions: Tensor, mask: Tensor | None, timesteps: Tensor | None
    ) -> list[BlockState | None]:
        """The recurrent state :meth:`step` leaves after a (left-padded) sequence's last step: every
        token read from the initial state but the last action, which the next step feeds first. What
        rebuilds a session from the episode so far in one forward."""
        token_mask = None if mask is None else mask.repeat_interleave(TOKENS_PER_STEP, dim=1)[:, :-1]
        tokens = self._tokens(rtg, states, actions, timesteps)[:, :-1]
        _, state = self._blocks(tokens, token_mask, self.initial_state(states.shape[0], states.device))
        return state

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> list[BlockState]:
        """The recurrent state of ``batch`` sequences that have not started."""
        if not self.config.supports_recurrent:
            raise ValueError(
                f"recurrent inference needs a Mamba global mixer, not {self.config.global_mixer}"
            )
        cfg = self.config
        device = device if device is not None else self.head.weight.device
        dtype = self.head.weight.dtype
        return [
            BlockState(
                local=torch.zeros(batch, cfg.dsm_window - 1, cfg.d_model, device=device, dtype=dtype),
                ssm=torch.zeros(batch, cfg.d_inner, cfg.d_state, device=device, dtype=dtype),
            )
            for _ in self.blocks
        ]

    def step(
        self,
        state: list[BlockState],
        rtg: Tensor,
        obs: Tensor,
        prev_action: Tensor,
        has_prev: Tensor,
        timesteps: Tensor | None = None,
    ) -> tuple[Tensor, list[BlockState]]:
        """One recurrent step for a batch of sequences: O(1) in the episode length.

        Feeds the tokens (a_{t-1}, rtg_t, s_t); ``has_prev`` [b] is False for sequences at t = 0,
        whose a_{t-1} slot is padding (their state must be the initial one). rtg [b, 1] scaled,
        obs [b, S] normalized, prev_action [b, A]; ``timesteps`` [b] is t, needed only by a policy
        with a timestep embedding. Returns a_t [b, A] and the new state; a state with ``slots``
        (see :class:`BlockState`) is updated in place and returned.
        """
        b = obs.shape[0]
        tokens = torch.stack(
            [self.embed_action(prev_action), self.embed_rtg(rtg), self.embed_state(obs)], dim=1
        )
        if self.embed_timestep is not None:
            t = self._timestep_embedding(timesteps)
            previous = self._timestep_embedding((timesteps - 1).clamp(min=0))
            tokens = tokens + torch.stack([previous, t, t], dim=1)
        tokens = self.embed_drop(self.embed_ln(tokens))
        mask = torch.ones(b, TOKENS_PER_STEP, dtype=torch.bool, device=obs.device)
        mask[:, 0] = has_prev
        h, new_state = self._blocks(tokens, mask, state)
        return self._action(h[:, -1]), new_state  # type: ignore[return-value]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
