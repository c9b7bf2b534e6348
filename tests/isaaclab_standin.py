"""A small torch stand-in for the surface of IsaacLab's DirectMARLEnv that ddpl_isaaclab.py uses (tests only).

Two agents with different observation and action sizes, dicts of torch tensors keyed by agent, bool terminated /
time_outs, a shared reward, state() and auto-reset inside step(): the observations and state() returned for a
finished env belong to its next episode, as in IsaacLab. Dynamics: a point p in R^2 moved by both hands' first
action dims; reward 2 exp(-|p - goal|) (shared); terminated when |p| > bound; time-out at max_episode_length steps.
"""

from types import SimpleNamespace

import torch

AGENTS = ("right_hand", "left_hand")
OBS_DIMS = {"right_hand": 7, "left_hand": 5}
ACT_DIMS = {"right_hand": 3, "left_hand": 2}
STATE_DIM = 6


class StandInMARLEnv:
    def __init__(self, num_envs=4, max_episode_length=6, bound=3.0, device="cpu", seed=0):
        self.num_envs, self.max_episode_length, self.bound = num_envs, max_episode_length, bound
        self.device = device  # a label only: the tensors always live on the CPU
        self.possible_agents = list(AGENTS)
        self.observation_spaces = {a: SimpleNamespace(shape=(OBS_DIMS[a],)) for a in AGENTS}
        self.action_spaces = {a: SimpleNamespace(shape=(ACT_DIMS[a],)) for a in AGENTS}
        self.gen = torch.Generator().manual_seed(seed)
        self.goal = torch.tensor([1.0, -0.5])
        self.pos = torch.zeros(num_envs, 2)
        self.t = torch.zeros(num_envs, dtype=torch.long)
        self.last_actions, self.num_steps, self.num_resets = None, 0, 0

    def _reset_idx(self, idx):
        self.pos[idx] = 0.5 * torch.randn(int(idx.numel()), 2, generator=self.gen)
        self.t[idx] = 0

    def _obs(self):
        t = (self.t.float() / self.max_episode_length)[:, None]
        right = torch.cat([self.pos, self.goal.expand(self.num_envs, 2), t, self.pos**2], dim=1)
        left = torch.cat([-self.pos, t, self.goal.expand(self.num_envs, 2)], dim=1)
        return {"right_hand": right, "left_hand": left}

    def state(self):
        extra = torch.stack([self.t.float(), self.pos.norm(dim=1)], dim=1)
        return torch.cat([self.pos, self.goal.expand(self.num_envs, 2), extra], dim=1)

    def reset(self):
        self._reset_idx(torch.arange(self.num_envs))
        self.num_resets += 1
        return self._obs(), {}

    def step(self, actions):
        for a in AGENTS:
            assert actions[a].shape == (self.num_envs, ACT_DIMS[a]), (a, actions[a].shape)
        self.last_actions = {a: actions[a].clone() for a in AGENTS}
        self.pos = self.pos + 0.5 * torch.stack([actions["right_hand"][:, 0], actions["left_hand"][:, 0]], dim=1)
        self.t += 1
        self.num_steps += 1
        reward = 2.0 * torch.exp(-(self.pos - self.goal).norm(dim=1))
        terminated = self.pos.norm(dim=1) > self.bound
        time_out = self.t >= self.max_episode_length
        done = torch.nonzero(terminated | time_out).flatten()
        self.last_pos = self.pos.clone()  # the true s' before the auto-reset (tests compare against it)
        self._reset_idx(done)
        rewards = {a: reward.clone() for a in AGENTS}
        return self._obs(), rewards, {a: terminated.clone() for a in AGENTS}, {a: time_out.clone() for a in AGENTS}, {}

    def close(self):
        pass
