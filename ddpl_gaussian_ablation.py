"""DDPL's policy-class ablation (arXiv 2605.07101, Sec. 5 "Ablation study", Fig. 4): diffusion vs Gaussian policies.

Algorithm 2 with ddpl_smax.py's loop, critics, replay buffer and hyperparameters; only the policy class changes:
`--policy gaussian` is a tanh-squashed Gaussian per agent, projected onto pi^t exp(eta Qbar_i) by reverse KL (the
paper's Thm 3.1) or weighted maximum likelihood (`--projection`), `--policy diffusion` is DDPL, `--compare` runs both;
`--env` mpe, smax or toy (Sec. 3's N-agent game). Flags, metrics and measured numbers: docs/ddpl_gaussian_ablation.md.
"""

import csv
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxmarl
import numpy as np
import optax
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO, map_name_to_scenario
from tqdm import tqdm

UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta", "action_std")
METRICS = ("episodic_return", "win_rate", "train_return", "train_win_rate", "q_first", "disc_return", *UPDATE_METRICS)
PROBE_SAMPLES = 512  # --probe-every: actions drawn per agent and probe
# JaxMARL 0.2.0's MPE scenarios that take action_type="Continuous" (tests/test_mpe.py checks the list)
MPE_SCENARIOS = "reference_v3 v3 tag_v3 world_comm_v3 spread_v3 crypto_v3 speaker_listener_v4 push_v3 adversary_v3"
ENV_IDS = Literal[tuple(f"MPE_simple_{name}" for name in MPE_SCENARIOS.split())]
SMAX_MAPS = tuple(sorted(MAP_NAME_TO_SCENARIO))  # --map's choices: the maps map_name_to_scenario knows
# the toy game's parameters: toy_failure_mode.py's defaults (tests/test_gaussian_ablation.py checks they agree)
TOY = {"bump_reward": 1.0, "bump_width": 0.1, "a_star": 0.8, "delta": 0.1, "p_goal": 0.5}
TOY |= {"goal_reward": 1.0, "goal_action": -0.5, "goal_width": 0.1}
TOY_HORIZON = 10  # steps per toy episode (ours): s0 is left at the first step; gamma^10 = 0.35 of the rest bootstraps
# a toy seed is SOLVED if its final eval (team) return per agent is at least this: the bump alone earns at most 1 per
# agent, more needs goal visits, and a solved policy earns about p (H - 1) = 4.5 per agent (docs: "Solved, not success")
TOY_SOLVED_RETURN = 2.0


@dataclass
class Args:
    exp_name: str = "ddpl_gaussian_ablation"  # the name of this experiment (part of the run folder's name)
    seed: int = 0  # seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)
    num_seeds: int = 1  # independent runs vmapped in one process, split over all local devices (a multiple of them)
    track: bool = False  # log to Weights & Biases as well (one run, every metric per class, N on the toy, and seed)
    wandb_project_name: str = "ddpl"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team); None: your default
    runs_dir: str = "runs"  # parent folder of the run folder

    # What is compared
    env: Literal["mpe", "smax", "toy"] = "mpe"  # mpe (--env-id), smax (--map) or toy (N-agent toy game; own defaults)
    env_id: ENV_IDS = "MPE_simple_reference_v3"  # with --env mpe: a continuous-action JaxMARL MPE scenario
    map: Literal[SMAX_MAPS] = "3s_vs_5z"  # with --env smax: an SMAX map (as ddpl_smax.py)
    toy_agents: tuple[int, ...] = (1, 2, 3, 4)  # with --env toy: the numbers of agents N, trained and evaluated in turn
    policy: Literal["gaussian", "diffusion"] = "gaussian"  # gaussian (ablation) or diffusion (DDPL); --compare: both
    projection: Literal["reverse", "forward"] = "reverse"  # Gaussian fit: reverse KL (the paper's) or forward (ours)
    compare: bool = False  # train DDPL and the Gaussian with the same seeds and budget, and compare
    probe_every: int = 0  # env steps between probes of pi at a fixed state (0: off); a multiple of --eval-every

    # Algorithm specific arguments (the DDPL scripts' defaults)
    total_timesteps: int = 2_000_000  # environment steps per seed (each of the --num-envs envs counts)
    num_envs: int = 20  # parallel envs, each stepped once per iteration (Table 3 "rollout batch size")
    buffer_size: int = 200_000  # replay buffer capacity in transitions (ours); circular
    learning_starts: int = 10_000  # environment steps of uniform random actions before the first update (ours)
    updates_per_iteration: int = 1  # U: gradient updates after each vector step (ours)
    batch_size: int = 256  # transitions per update (Table 3)
    gamma: float = 0.99  # discount factor (ours)
    tau: float = 0.005  # Polyak rate of the target critics (Table 3 "smoothing parameter")
    learning_rate: float = 1e-4  # Adam learning rate of actors and critics at the start, decayed linearly (Table 3)
    learning_rate_end: float = 5e-5  # Adam learning rate at the last update (Table 3)
    hidden_size: int = 256  # width of the 3 mish layers of score networks, Gaussian actors and critics (Table 3)
    num_diffusion_steps: int = 20  # K: denoising steps of the diffusion policies (Table 3)
    noise_schedule: Literal["linear", "cosine", "vp"] = "cosine"  # beta schedule (ours: cosine; Table 3: linear)
    eta: float = 1.0  # DecSPG step eta of the target pi^t exp(eta Qbar) (Table 3), for both classes
    num_action_samples: int = 4  # M: actions per state for ISSM and the Gaussian fits (ours); >= 2
    issm_batch_size: int = 0  # B_p: states in the policy step, both classes (ours); 0: batch_size // M
    weight_rule: Literal["state", "batch", "raw"] = "state"  # Qbar's ISSM softmax scale (ours): state std, running, raw
    target_ess: float = 0.0  # 0: fixed eta; in (0, 1): eta adapts to hold the weights' mean ESS / M at this target
    proposal_mix: float = 0.0  # m: share of ISSM proposals uniform on the box (ours); target ((1-m) pi^t + m U) e^eta Q
    reward_scale: float = 1.0  # multiplies rewards in the TD target (ours)
    team_reward: bool = True  # MPE: critics learn the mean reward over agents; SMAX has one team reward
    eval_every: int = 20_000  # environment steps between evaluations (one jitted chunk of training each)
    num_eval_episodes: int = 50  # episodes per seed and evaluation, stochastic policy (paper Sec. 5)


# --env toy's defaults (ours): toy_failure_mode.py's discount, small networks, 10 seeds of N = 1 and 2, and issue 25's
# exploration setting: a tenth of the proposals uniform (--proposal-mix), which makes a sharper eta (5) safe, 4 updates
# per iteration on all 128 states, tau 0.05 (docs/ddpl_gaussian_ablation.md, "The toy game" and "Issue 25")
TOY_DEFAULTS = Args(
    env="toy", toy_agents=(1, 2), num_seeds=10, total_timesteps=20_000, num_envs=8, buffer_size=20_000,
    learning_starts=2_000, batch_size=128, gamma=0.9, tau=0.05, learning_rate=1e-3, learning_rate_end=1e-4,
    hidden_size=64, num_diffusion_steps=10, eval_every=5_000, num_eval_episodes=100, updates_per_iteration=4,
    issm_batch_size=128, proposal_mix=0.1, eta=5.0,
)  # fmt: skip


# ALGO LOGIC: environment glue, ddpl_mpe.py's MPEArrays and ddpl_smax.py's SMAXArrays (the same text), and the toy.
# The loop sees every env as SMAXArrays: obs (N, obs_dim), a critic state, actions in [-1, 1]^(N, act_dim), flags.
class MPEArrays:
    """MPE as arrays: obs (N, D), actions in [-1, 1]^(N, A), rewards (N,); smaller agents' dims zero-padded."""

    def __init__(self, env_id: str):
        self.env = jaxmarl.make(env_id, action_type="Continuous")
        self.agents, self.num_agents = self.env.agents, len(self.env.agents)
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [self.env.action_space(a).shape[0] for a in self.agents]
        self.obs_dim, self.act_dim = max(self.obs_dims), max(self.act_dims)
        box = [(self.env.action_space(a), d) for a, d in zip(self.agents, self.act_dims, strict=True)]
        self.low = [jnp.broadcast_to(jnp.asarray(s.low, jnp.float32), (d,)) for s, d in box]  # MPE: [0, 1]
        self.high = [jnp.broadcast_to(jnp.asarray(s.high, jnp.float32), (d,)) for s, d in box]
        self.episode_length = self.env.max_steps + 1  # done is raised when step >= max_steps: 26 steps for MPE

    def stack_obs(self, obs: dict) -> jax.Array:
        dims = zip(self.agents, self.obs_dims, strict=True)
        return jnp.stack([jnp.pad(obs[a], (0, self.obs_dim - d)) for a, d in dims])

    def reset(self, key):
        obs, state = self.env.reset(key)
        return self.stack_obs(obs), state

    def step(self, key, state, action):
        """-> (next_obs, the true successor, for the buffer; obs, the next input, reset where done; state, r, done)"""
        env_action = {  # learner actions in [-1, 1] mapped affinely onto the box (MPE: [0, 1])
            a: lo + 0.5 * (action[i, :d] + 1.0) * (hi - lo)
            for i, (a, d, lo, hi) in enumerate(zip(self.agents, self.act_dims, self.low, self.high, strict=True))
        }
        key, key_reset = jax.random.split(key)  # step_env, then reset: env.step would drop the terminal observation
        obs_st, state_st, reward, dones, _ = self.env.step_env(key, state, env_action)
        obs_re, state_re = self.env.reset(key_reset)
        done = dones["__all__"]
        state = jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st)
        next_obs = self.stack_obs(obs_st)
        obs = jnp.where(done, self.stack_obs(obs_re), next_obs)
        return next_obs, obs, state, jnp.stack([reward[a] for a in self.agents]), done


def no_deaths_step(next_obs, obs, state, reward, done, won) -> dict:
    """SMAXArrays.step's dict when nobody dies and only time limits end episodes (truncation); critic state: all obs."""
    alive = jnp.ones(obs.shape[0], bool)
    successor = {"next_obs": next_obs, "next_world_state": next_obs.reshape(-1), "reward": reward}
    flags = {"terminal": jnp.float32(0.0), "done": done, "won": won, "alive": alive, "next_alive": alive}
    return successor | flags | {"obs": obs, "world_state": obs.reshape(-1), "state": state}


class MPEGlue(MPEArrays):
    """MPEArrays of --env-id seen as SMAXArrays (no_deaths_step): nobody wins either."""

    def __init__(self, args: Args):
        super().__init__(args.env_id)
        self.state_dim, self.team_reward = self.num_agents * self.obs_dim, args.team_reward

    def reset(self, key):
        obs, state = super().reset(key)
        return obs, obs.reshape(-1), state

    def step(self, key, state, action) -> dict:
        next_obs, obs, state, reward, done = super().step(key, state, action)
        reward = jnp.full_like(reward, reward.mean()) if self.team_reward else reward  # identical interest
        return no_deaths_step(next_obs, obs, state, reward, done, won=jnp.bool_(False))


class SMAXArrays:
    """HeuristicEnemySMAX as arrays: obs (N, obs_dim) per ally, critic state (state_dim,), one team reward, learner
    actions in [-1, 1]^(N, 4): [shoot_last_enemy, do_shoot, r, angle / 2pi] (docs/ddpl_smax.md, "Environment")."""

    ACTION_EPS = 1e-3  # env actions stay in [eps, 1 - eps]: the env samples move-vs-shoot from log(a), log(1 - a)

    def __init__(self, map_name: str, **smax_kwargs):  # smax_kwargs, e.g. max_steps, go to SMAX (tests use them)
        scenario = map_name_to_scenario(map_name)
        self.env = jaxmarl.make("HeuristicEnemySMAX", scenario=scenario, action_type="continuous", **smax_kwargs)
        self.agents, self.num_agents = self.env.agents, self.env.num_allies
        self.obs_dim = self.env.observation_space(self.agents[0]).shape[0]
        self.state_dim = (self.env.num_allies + self.env.num_enemies) * len(self.env.own_features)  # every unit
        self.act_dim = len(self.env.continuous_action_dims)  # 4
        self.episode_length = self.env.max_steps + 1  # done is raised when step >= max_steps: at most 101 steps

    def critic_state(self, state) -> jax.Array:
        """Every unit's features, scaled as in its own observation (zeros when dead); jaxmarl's world_state is not."""
        units = jnp.arange(self.env.num_allies + self.env.num_enemies)
        return jax.vmap(self.env._get_own_features, (None, 0))(state.state, units).reshape(-1)

    def reset(self, key):
        """(obs, world_state, state). Weak types are made strong, or a jitted step recompiles on a stepped state."""
        obs, state = self.env.reset(key)
        state = jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), state)
        return jnp.stack([obs[a] for a in self.agents]), self.critic_state(state), state

    def to_env_action(self, action):
        """Learner actions in [-1, 1] (the sampler clips) -> [eps, 1 - eps], affinely. The env does NOT clip."""
        eps = self.ACTION_EPS
        return jnp.clip(eps + (1.0 - 2.0 * eps) * 0.5 * (action + 1.0), eps, 1.0 - eps)

    def step(self, key, state, action) -> dict:
        """One env step -> dict: next_* the true successor s' (for the buffer); obs, world_state, state what the
        policies see next, reset where the episode ended. step_env + reset: env.step drops the last obs and the win."""
        env_action = dict(zip(self.agents, self.to_env_action(action), strict=True))
        key, key_reset = jax.random.split(key)
        obs_st, state_st, reward, dones, _ = self.env.step_env(key, state, env_action)
        obs_re, world_state_re, state_re = self.reset(key_reset)
        done, n = dones["__all__"], self.num_agents
        next_obs, next_world_state = jnp.stack([obs_st[a] for a in self.agents]), self.critic_state(state_st)
        alive, next_alive = state.state.unit_alive, state_st.state.unit_alive  # allies first, then enemies
        allies_dead, enemies_dead = ~next_alive[:n].any(), ~next_alive[n:].any()
        out = {"next_obs": next_obs, "next_world_state": next_world_state}  # the true successor s' (for the buffer)
        # a whole team dead ends the episode; the step-101 time limit is truncation (done, not terminal)
        out |= {"terminal": (allies_dead | enemies_dead).astype(jnp.float32), "done": done}
        # the team reward (identical for every ally); won: exactly when SMAX pays the won_battle_bonus
        out |= {"reward": reward[self.agents[0]], "won": enemies_dead & ~allies_dead}
        out |= {"alive": alive[:n], "next_alive": next_alive[:n]}  # allies alive at s and at s' (before any reset)
        obs, world_state = jnp.where(done, obs_re, next_obs), jnp.where(done, world_state_re, next_world_state)
        out |= {"obs": obs, "world_state": world_state}  # what the policies see next: reset where the episode ended
        return out | {"state": jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st)}


class ToyArrays:
    """The paper's N-agent toy game (Sec. 3.2) as SMAXArrays: each agent plays its own copy of the MDP of Sec. 3.2.1,
    observes its copy's state (one-hot s0 / goal / sink) and gets the team reward, the sum over copies."""

    def __init__(self, num_agents: int):
        self.num_agents, self.obs_dim, self.act_dim = num_agents, 3, 1
        self.state_dim, self.episode_length = 3 * num_agents, TOY_HORIZON

    def reset(self, key):
        state = {"pos": jnp.zeros(self.num_agents, jnp.int32), "t": jnp.int32(0)}  # 0: s0, 1: goal, 2: sink
        obs = jax.nn.one_hot(state["pos"], 3)
        return obs, obs.reshape(-1), state

    def step(self, key, state, action) -> dict:
        p, a, pos = TOY, action[:, 0], state["pos"]
        bump = p["bump_reward"] * jnp.exp(-(a**2) / (2 * p["bump_width"] ** 2))  # s0: c0 exp(-a^2 / 2 w0^2)
        goal = p["goal_reward"] * jnp.exp(-((a - p["goal_action"]) ** 2) / (2 * p["goal_width"] ** 2))
        hit = jax.random.uniform(key, a.shape) < p["p_goal"] * (jnp.abs(a - p["a_star"]) <= p["delta"])
        reward = jnp.full(self.num_agents, jnp.where(pos == 0, bump, jnp.where(pos == 1, goal, 0.0)).sum())  # the sum
        next_pos = jnp.where(pos == 0, jnp.where(hit, 1, 2), pos)  # s0 -> goal w.p. p 1{|a - a*| <= delta}, else sink
        done = state["t"] + 1 >= self.episode_length
        next_obs = jax.nn.one_hot(next_pos, 3)
        obs_re, _, state_re = self.reset(key)
        state = jax.tree.map(lambda r, s: jnp.where(done, r, s), state_re, {"pos": next_pos, "t": state["t"] + 1})
        won = done & (next_pos == 1).all()  # every copy at goal when the episode ends
        return no_deaths_step(next_obs, jnp.where(done, obs_re, next_obs), state, reward, done, won)


def buffer_init(size: int, N: int, D: int, S: int, A: int) -> dict:
    """Fixed-size replay arrays for N agents, D-dim observations, an S-dim critic state and A-dim actions."""
    shapes = {"obs": (N, D), "world_state": (S,), "action": (N, A), "reward": (N,), "next_obs": (N, D)}
    shapes |= {"next_world_state": (S,), "terminal": (), "alive": (N,), "next_alive": (N,)}
    return {name: jnp.zeros((size, *shape)) for name, shape in shapes.items()}


def buffer_add(buffer: dict, transitions: dict, iteration) -> dict:
    """Circular insert of one vector step (E transitions) at rows iteration * E, ..., mod the buffer size."""
    size, num = buffer["terminal"].shape[0], transitions["terminal"].shape[0]
    rows = (iteration * num + jnp.arange(num)) % size
    return jax.tree.map(lambda b, x: b.at[rows].set(x.astype(b.dtype)), buffer, transitions)


# ALGO LOGIC: the Gaussian policy class (docs/algorithm.md sec. 7): a = tanh(u), u ~ N(mu(o), diag sigma(o)^2), squashed
# as in SAC and HASAC (a clipped Gaussian's samples past the box carry no Q gradient and freeze the mean there)
LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


class GaussianActor(nn.Module):
    """mu_theta(o) and log sigma_theta(o): MLP with mish (Table 3's network shape), two linear heads."""

    action_dim: int
    hidden: int = 256
    num_layers: int = 3

    @nn.compact
    def __call__(self, obs):
        h = obs
        for _ in range(self.num_layers):
            h = mish(nn.Dense(self.hidden)(h))
        return nn.Dense(self.action_dim)(h), jnp.clip(nn.Dense(self.action_dim)(h), LOG_STD_MIN, LOG_STD_MAX)


def squashed_log_prob(u, mean, log_std):
    """log density of a = tanh(u), u ~ N(mean, diag exp(log_std)^2): log N(u) - sum log(1 - tanh(u)^2), stably."""
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    z = (u - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1) - jnp.sum(log_det, axis=-1)


def alive_issm_weights(weights, alive):
    """ISSM weights (B, M), alive (B,) in {0, 1} -> dead rows 0, the rest x B / (rows alive): a mean over the living."""
    return weights * alive[:, None] * alive.shape[0] / jnp.maximum(alive.sum(), 1.0)


def make_policy(args: Args, policy: str, A: int):
    """init(key, D), sample(params, obs, key) -> actions in [-1, 1], actor_loss(params, old_params = pi^t, obs, alive
    (B,), q_fn, temp, key) -> (loss, (temp, [max_weight, ess, eta, action_std])). q_fn(actions (B, M, A)) -> Qbar_i
    (B, M) from the just-updated online critics; temp: issm_temperature's state (both classes share it)."""
    M, mix = args.num_action_samples, args.proposal_mix
    temperature = (args.weight_rule, args.eta, args.target_ess)  # issm_temperature's arguments, both classes
    living_mean = lambda x, alive: (x * alive).sum() / jnp.maximum(alive.sum(), 1.0)  # noqa: E731
    if policy == "diffusion":  # DDPL: ISSM on M actions drawn from pi^t (eq. 2), exactly as the DDPL scripts
        sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
        net = ScoreNet(action_dim=A, hidden=args.hidden_size)

        def init(key, D):
            return net.init(key, jnp.zeros((1, A)), jnp.ones(1, jnp.int32), jnp.zeros((1, D)))

        def sample(params, obs, key):
            return sample_actions(net.apply, params, obs, key, sched, A)

        def actor_loss(params, old_params, obs, alive, q_fn, temp, key):
            k_prop, k_dsm = jax.random.split(key)
            proposals = sample(old_params, jnp.broadcast_to(obs[:, None], (obs.shape[0], M, obs.shape[-1])), k_prop)
            proposals = mix_proposals(proposals, jax.random.fold_in(k_prop, 1), mix)
            weights, temp, ess, eta = issm_temperature(temp, q_fn(proposals), *temperature, alive)
            loss = dsm_loss(net.apply, params, obs, proposals, k_dsm, sched, alive_issm_weights(weights, alive))
            stats = [living_mean(weights.max(-1), alive), ess, eta, proposals.std(axis=1).mean()]
            return loss, (temp, jnp.stack(stats))

        return init, sample, actor_loss

    net = GaussianActor(action_dim=A, hidden=args.hidden_size)

    def init(key, D):
        return net.init(key, jnp.zeros((1, D)))

    def sample(params, obs, key):
        mean, log_std = net.apply(params, obs)
        return jnp.tanh(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape))

    def scaled(q, temp):  # Qbar as the ISSM softmax sees it under --weight-rule; the scale carries no gradient
        if args.weight_rule == "state":
            mean, std = q.mean(axis=-1, keepdims=True), q.std(axis=-1, keepdims=True)
            return (q - jax.lax.stop_gradient(mean)) / jax.lax.stop_gradient(std + 1e-6)
        return q / (jnp.maximum(temp["q_scale"], 1e-6) if args.weight_rule == "batch" else 1.0)

    def actor_loss(params, old_params, obs, alive, q_fn, temp, key):
        mean, log_std = net.apply(params, obs)
        old_mean, old_log_std = net.apply(old_params, obs)
        mask = alive[:, None] / jnp.maximum(alive.mean(), 1e-6)  # mean over the rows where the agent is alive
        eps = jax.random.normal(key, (obs.shape[0], M, A))
        if args.projection == "reverse":
            # min E_{a ~ pi_theta}[log pi_theta(a|o) - log pi^t(a|o) - eta Qbar(s, a)], reparameterised (Thm 3.1);
            # the same u under both policies: tanh's log-det cancels in the ratio
            u = mean[:, None] + jnp.exp(log_std)[:, None] * eps
            x = jnp.tanh(u)
            q = q_fn(x)
            weights, temp, ess, eta = issm_temperature(temp, jax.lax.stop_gradient(q), *temperature, alive)
            log_new = squashed_log_prob(u, mean[:, None], log_std[:, None])
            log_old = squashed_log_prob(u, old_mean[:, None], old_log_std[:, None])
            if mix > 0:  # log of the mixture (1 - m) pi^t + m U, U's density 2^-A on the box
                log_old = jnp.logaddexp(jnp.log1p(-mix) + log_old, jnp.log(mix) - A * jnp.log(2.0))
            loss = jnp.mean(mask * (log_new - log_old - eta * scaled(q, temp)))
        else:  # forward KL (ours): weighted maximum likelihood of M actions from pi^t with the ISSM weights
            u = jax.lax.stop_gradient(old_mean[:, None] + jnp.exp(old_log_std)[:, None] * eps)  # a = tanh(u)
            x = jnp.tanh(u)
            if mix > 0:  # the proposal (1 - m) pi^t + m U, as for diffusion; m = 0 keeps u (arctanh(tanh u) != u)
                x = mix_proposals(x, jax.random.fold_in(key, 1), mix)
                u = jnp.arctanh(jnp.clip(x, -1.0 + 1e-6, 1.0 - 1e-6))
            weights, temp, ess, eta = issm_temperature(temp, q_fn(x), *temperature, alive)
            log_lik = squashed_log_prob(u, mean[:, None], log_std[:, None])
            loss = -jnp.mean(jnp.sum(alive_issm_weights(weights, alive) * log_lik, axis=-1))
        stats = [living_mean(weights.max(-1), alive), ess, eta, x.std(axis=1).mean()]  # x's spread: as for diffusion
        return loss, (temp, jnp.stack(stats))

    return init, sample, actor_loss


# --- DDPL core: begin ---
# Identical text in every ddpl_*.py and toy_failure_mode.py (tests/test_core_identity.py). docs/algorithm.md sec. 3-5.
def make_noise_schedule(name: str, K: int) -> dict:
    """Betas b_1..b_K of K denoising steps and the DDPM coefficients derived from them (docs/algorithm.md sec. 3)."""
    if name == "linear":  # Table 3: "linear, start 0.001, end 0.999"
        betas = jnp.linspace(1e-3, 0.999, K)
    elif name == "cosine":  # Nichol & Dhariwal (2021), s = 0.008, b clipped at 0.999
        f = jnp.cos((jnp.arange(K + 1) / K + 0.008) / 1.008 * jnp.pi / 2) ** 2
        betas = jnp.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    elif name == "vp":  # discretised VP-SDE as in DACER's code, b_min 0.1, b_max 10
        t = jnp.arange(1, K + 1)
        betas = 1.0 - jnp.exp(-0.1 / K - 0.5 * (10.0 - 0.1) * (2 * t - 1) / K**2)
    else:
        raise ValueError(f"unknown noise schedule {name!r}; choose from linear, cosine, vp")
    alphas, abar = 1.0 - betas, jnp.cumprod(1.0 - betas)
    abar_prev = jnp.concatenate([jnp.ones(1), abar[:-1]])
    # c1, c2: posterior mean of x_{k-1} given x_k and x0_hat (Ho et al. 2020, eq. 7). sigma_k^2 = b_k (ours): with
    # K = 20 the posterior variance makes broad policies too narrow (docs/algorithm.md sec. 3 "Measured")
    c1, c2 = jnp.sqrt(abar_prev) * betas / (1.0 - abar), jnp.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar)
    return {"betas": betas, "abar": abar, "c1": c1, "c2": c2, "sigma": jnp.sqrt(betas)}


def mish(x):
    """x tanh(softplus(x)) with one exp: tanh(log(1 + e^x)) = n / (n + 2), n = e^x (e^x + 2)."""
    n = jnp.exp(jnp.minimum(x, 20.0))  # for x > 20 the ratio is 1 in float32
    n = n * (n + 2.0)
    return x * n / (n + 2.0)


def step_embedding(k):
    """Sinusoidal embedding of the denoising step k (any shape) -> (..., 16)."""
    angles = jnp.asarray(k)[..., None].astype(jnp.float32) * jnp.exp(-jnp.log(1000.0) * jnp.arange(8) / 8)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ScoreNet(nn.Module):
    """Noise predictor eps_theta(x_k, k, o): MLP with mish (Table 3) on [x_k, sin-emb(k), o]. The sampler evaluates
    __call__ in two parts: condition(o) once per chain, then denoise(x_k, k, condition(o)) at every step."""

    action_dim: int
    hidden: int = 256
    num_layers: int = 3

    @nn.compact
    def __call__(self, x, k, obs):
        h = jnp.concatenate([x, step_embedding(k), obs], axis=-1)
        for _ in range(self.num_layers):
            h = mish(nn.Dense(self.hidden)(h))
        return nn.Dense(self.action_dim)(h)

    def condition(self, obs):
        """o @ W_o + b of the first layer [x, emb(k), o] @ W + b: the same at every denoising step."""
        first = self.variables["params"]["Dense_0"]
        return obs @ first["kernel"][self.action_dim + 16 :] + first["bias"]

    def denoise(self, x, k, cond):
        """__call__(x, k, o) given cond = condition(o); k a scalar step shared by all rows."""
        p = self.variables["params"]
        w = p["Dense_0"]["kernel"]
        h = mish(x @ w[: self.action_dim] + step_embedding(k) @ w[self.action_dim : self.action_dim + 16] + cond)
        for i in range(1, self.num_layers + 1):
            h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            h = mish(h) if i < self.num_layers else h
        return h


def sample_actions(apply_fn, params, obs, key, sched, action_dim):
    """Reverse DDPM chain x_K ~ N(0, I) -> x_0 in one lax.scan, then a = clip(x_0, -1, 1) (Sec. 4.1). obs (..., obs_dim)
    -> actions (..., action_dim). keys = split(key, K + 1): keys[0] draws x_K, keys[1 + K - k] the noise of step k."""
    K = sched["betas"].shape[0]
    keys = jax.random.split(key, K + 1)
    x_K = jax.random.normal(keys[0], obs.shape[:-1] + (action_dim,))
    cond = apply_fn(params, obs, method="condition")  # the observation's share of the first layer, once per chain

    def step(x, inp):
        k, step_key = inp  # k runs K..1
        i, eps = k - 1, apply_fn(params, x, k, cond, method="denoise")
        # x0 prediction clipped to the action box (as in DACER), then the DDPM posterior mean
        x0 = jnp.clip((x - jnp.sqrt(1.0 - sched["abar"][i]) * eps) / jnp.sqrt(sched["abar"][i]), -1.0, 1.0)
        noise = jnp.where(k > 1, sched["sigma"][i], 0.0) * jax.random.normal(step_key, x.shape)
        return sched["c1"][i] * x0 + sched["c2"][i] * x + noise, None

    return jnp.clip(jax.lax.scan(step, x_K, (jnp.arange(K, 0, -1), keys[1:]))[0], -1.0, 1.0)


def dsm_loss(apply_fn, params, obs, x0, key, sched, weights=None):
    """Denoising score matching (eq. 1) on x0 (B, M, d) with obs (B, obs_dim). weights (B, M), if given, replace the
    plain mean over the M samples of each state (ISSM, eq. 2)."""
    B, M, d = x0.shape
    K = sched["betas"].shape[0]
    k_key, eps_key = jax.random.split(key)
    k = jax.random.randint(k_key, (B, M), 1, K + 1)
    eps = jax.random.normal(eps_key, x0.shape)
    abar = sched["abar"][k - 1][..., None]
    x_k = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
    obs_m = jnp.broadcast_to(obs[:, None, :], (B, M, obs.shape[-1]))
    per_sample = jnp.sum((apply_fn(params, x_k, k, obs_m) - eps) ** 2, axis=-1)
    weights = jnp.full((B, M), 1.0 / M) if weights is None else weights
    return jnp.mean(jnp.sum(weights * per_sample, axis=-1))


def issm_weights(q, eta, q_scale=None):
    """Self-normalised weights softmax_j(eta Qbar(s, a_j) / scale) over a state's M samples: pi^{t+1} / pi^t =
    exp(eta Qbar) / Z(s) (Sec. 4.1). scale: q_scale, or (None) each state's own std (ours: docs/algorithm.md sec. 4)."""
    q = (q - q.mean(-1, keepdims=True)) / (q.std(-1, keepdims=True) + 1e-6) if q_scale is None else q / q_scale
    return jax.lax.stop_gradient(jax.nn.softmax(eta * q, axis=-1))


def mix_proposals(proposals, key, mix):
    """Each proposal (..., d) replaced with probability mix by a uniform draw on [-1, 1]^d: the ISSM target becomes
    ((1 - mix) pi^t + mix U) exp(eta Qbar) / Z, a floor of mass on every action (ours: docs/algorithm.md sec. 4)."""
    k_pick, k_box = jax.random.split(key)
    pick = jax.random.uniform(k_pick, proposals.shape[:-1] + (1,)) < mix
    return jnp.where(pick, jax.random.uniform(k_box, proposals.shape, minval=-1.0, maxval=1.0), proposals)


def weight_ess(weights):
    """Effective sample size of each state's weights as a fraction of M: 1 / (M sum_j w_j^2), in [1/M, 1]."""
    return 1.0 / (weights.shape[-1] * jnp.sum(weights**2, axis=-1))


def issm_temperature(temp, q, rule, eta, target_ess, mask=None, rate=0.01):
    """ISSM weights (B, M) at this update's temperature -> (weights, new temp, mean ESS fraction, eta_t). Ours.
    rule "state": each state's Qbar over its own std; "batch": over a running mean (rate per update) of the batch's
    mean within-state std; "raw": Qbar as it is. target_ess > 0 adapts eta_t = eta exp(log_eta) by dual ascent on the
    mean ESS fraction, as SAC tunes alpha. mask (B,) drops rows from both means (dead SMAX allies). temp starts 0."""
    mask = jnp.ones(q.shape[0]) if mask is None else mask
    mean = lambda x: (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)  # noqa: E731
    std = mean(q.std(axis=-1))
    q_scale = jnp.where(temp["q_scale"] > 0, (1.0 - rate) * temp["q_scale"] + rate * std, std)
    scale = {"state": None, "batch": jnp.maximum(q_scale, 1e-6), "raw": 1.0}[rule]
    eta_t = eta * jnp.exp(temp["log_eta"])
    weights = issm_weights(q, eta_t, scale)
    ess = mean(weight_ess(weights))
    log_eta = temp["log_eta"] + (rate * (ess - target_ess) if target_ess > 0 else 0.0)
    return weights, {"log_eta": log_eta, "q_scale": q_scale}, ess, eta_t


class TwinCritic(nn.Module):
    """Twin averaged-Q critics Qbar_i(s, a_i): global state and the agent's OWN action (Alg. 2, line 5)."""

    hidden: int = 256
    num_layers: int = 3

    @nn.compact
    def __call__(self, state, action):
        qs = []
        for _ in range(2):
            h = jnp.concatenate([state, action], axis=-1)
            for _ in range(self.num_layers):
                h = mish(nn.Dense(self.hidden)(h))
            qs.append(nn.Dense(1)(h)[..., 0])
        return qs[0], qs[1]


# --- DDPL core: end ---


# ALGO LOGIC: Algorithm 2 (ddpl_smax.py's loop) with a pluggable policy class. One iteration: every env steps once,
# then U updates of every agent's critic and policy.
def make_train(args: Args, env, policy: str):
    """Per-seed functions (main jits and vmaps them over seeds): init(seed) -> runner state, chunk(state, chunk) ->
    (state, metrics) for --eval-every env steps in one lax.scan, evaluate(actor, seed, step), critic_value, probe."""
    N, D, S, A = env.num_agents, env.obs_dim, env.state_dim, env.act_dim  # agents, obs, critic-state, action dims
    E, B = args.num_envs, args.batch_size
    Bp = args.issm_batch_size or max(1, B // args.num_action_samples)  # states per policy step (the DDPL scripts' B_p)
    iters_per_chunk = args.eval_every // E
    num_iterations = (args.total_timesteps // (iters_per_chunk * E)) * iters_per_chunk
    num_updates = max(1, args.updates_per_iteration * (num_iterations - args.learning_starts // E))
    init_actor, sample, actor_loss = make_policy(args, policy, A)
    critic_net = TwinCritic(hidden=args.hidden_size)
    # Table 3: Adam, learning rate linear 1e-4 -> 5e-5 over training, for actors and critics alike
    tx = optax.adam(optax.linear_schedule(args.learning_rate, args.learning_rate_end, num_updates))

    def act(actor, obs, key):
        """Decentralized execution: agent i samples a_i ~ pi_i(.|o_i). obs (..., N, D) -> actions (..., N, A)."""
        return jnp.moveaxis(jax.vmap(sample)(actor, jnp.moveaxis(obs, -2, 0), jax.random.split(key, N)), 0, -2)

    def env_step(key, state, action):  # SMAX pays one team reward: every agent's critic learns it
        out = env.step(key, state, action)
        return out | {"reward": jnp.broadcast_to(out["reward"], (N,))}

    def init(seed):
        key, k_actor, k_critic, k_env = jax.random.split(jax.random.PRNGKey(seed), 4)
        # agents are a stacked leading axis of every parameter pytree: separate parameters, vmapped
        actor = jax.vmap(init_actor, (0, None))(jax.random.split(k_actor, N), D)
        critic = jax.vmap(critic_net.init, (0, None, None))(
            jax.random.split(k_critic, N), jnp.zeros((1, S)), jnp.zeros((1, A))
        )
        learner = {"actor": actor, "critic": critic, "critic_target": critic}
        learner |= {"actor_opt": jax.vmap(tx.init)(actor), "critic_opt": jax.vmap(tx.init)(critic)}
        learner["temp"] = {"log_eta": jnp.zeros(N), "q_scale": jnp.zeros(N)}  # issm_temperature's state per agent
        obs, world_state, env_state = jax.vmap(env.reset)(jax.random.split(k_env, E))
        rs = {"learner": learner, "buffer": buffer_init(args.buffer_size, N, D, S, A), "env_state": env_state}
        return rs | {"obs": obs, "world_state": world_state, "ep_return": jnp.zeros(E), "key": key}

    def update_agent(p, mine, shared, key):
        """One critic and one policy step of one agent (vmapped over agents). mine: its o_i, a_i, r_i, o_i', alive at s
        and s'; shared: s, s', terminal. Dead SMAX allies act 0 for the critics and leave the policy step (docs)."""
        k_next, k_actor = jax.random.split(key)
        # Averaged-Q critic (Alg. 2, line 5): critic state and OWN action; a_i' ~ pi_i(.|o_i')
        next_action = sample(p["actor"], mine["next_obs"], k_next) * mine["next_alive"][:, None]
        q_next = jnp.minimum(*critic_net.apply(p["critic_target"], shared["next_state"], next_action))
        y = mine["reward"] * args.reward_scale + args.gamma * (1.0 - shared["terminal"]) * q_next
        action = mine["action"] * mine["alive"][:, None]

        def critic_loss(params):
            q1, q2 = critic_net.apply(params, shared["state"], action)
            return jnp.mean((q1 - y) ** 2) + jnp.mean((q2 - y) ** 2), q1.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(p["critic"])
        updates, critic_opt = tx.update(grads, p["critic_opt"])
        critic = optax.apply_updates(p["critic"], updates)

        def q_fn(actions):  # Qbar_i = min of the twin ONLINE critics, just updated (as the DDPL scripts)
            states = jnp.broadcast_to(shared["state"][: actions.shape[0], None], (*actions.shape[:2], S))
            return jnp.minimum(*critic_net.apply(critic, states, actions))

        old = jax.lax.stop_gradient(p["actor"])  # pi^t
        obs, alive = mine["obs"][:Bp], mine["alive"][:Bp]  # the policy step's B_p states (rows are i.i.d.)
        (a_loss, (temp, stats)), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            p["actor"], old, obs, alive, q_fn, p["temp"], k_actor
        )
        updates, actor_opt = tx.update(grads, p["actor_opt"])
        actor = optax.apply_updates(p["actor"], updates)
        critic_target = optax.incremental_update(critic, p["critic_target"], args.tau)  # Polyak (Table 3)
        p = {"actor": actor, "actor_opt": actor_opt, "critic": critic, "critic_target": critic_target, "temp": temp}
        return p | {"critic_opt": critic_opt}, jnp.concatenate([jnp.stack([c_loss, a_loss, q_mean]), stats])

    def update(rs, iteration, key):
        k_idx, k_agents = jax.random.split(key)
        filled = jnp.minimum((iteration + 1) * E, args.buffer_size)
        batch = jax.tree.map(lambda x: x[jax.random.randint(k_idx, (B,), 0, filled)], rs["buffer"])
        agent_keys = ("obs", "action", "reward", "next_obs", "alive", "next_alive")
        mine = {k: jnp.swapaxes(batch[k], 0, 1) for k in agent_keys}  # agents first
        shared = {"state": batch["world_state"], "next_state": batch["next_world_state"], "terminal": batch["terminal"]}
        learner, metrics = jax.vmap(update_agent, in_axes=(0, 0, None, 0))(
            rs["learner"], mine, shared, jax.random.split(k_agents, N)
        )
        return rs | {"learner": learner}, metrics.mean(axis=0)

    def iteration_step(carry, iteration):
        rs, ep_stats = carry
        key, k_act, k_env, k_upd = jax.random.split(rs["key"], 4)
        # iteration is not vmapped over seeds, so both conds stay real branches (no work wasted under vmap)
        action = jax.lax.cond(
            iteration * E < args.learning_starts,  # warm-up: uniform random actions
            lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0),
            lambda: act(rs["learner"]["actor"], rs["obs"], k_act),
        )
        out = jax.vmap(env_step)(jax.random.split(k_env, E), rs["env_state"], action)
        transitions = {"obs": rs["obs"], "world_state": rs["world_state"], "action": action, "reward": out["reward"]}
        transitions |= {k: out[k] for k in ("next_obs", "next_world_state", "terminal", "alive", "next_alive")}
        ep_return, done = rs["ep_return"] + out["reward"].mean(axis=-1), out["done"]  # return averaged over agents
        ep_stats = ep_stats + jnp.stack([jnp.sum(ep_return * done), jnp.sum(out["won"] & done), jnp.sum(done)])
        rs |= {"buffer": buffer_add(rs["buffer"], transitions, iteration), "env_state": out["state"]}
        rs |= {"obs": out["obs"], "world_state": out["world_state"], "ep_return": ep_return * (1 - done), "key": key}

        def updates(rs):
            keys = jax.random.split(k_upd, args.updates_per_iteration)
            rs, metrics = jax.lax.scan(lambda r, k: update(r, iteration, k), rs, keys)
            return rs, metrics.mean(axis=0), jnp.float32(1.0)

        learn = ((iteration + 1) * E >= args.learning_starts) & (args.updates_per_iteration > 0)
        no_updates = lambda rs: (rs, jnp.zeros(len(UPDATE_METRICS)), jnp.float32(0.0))  # noqa: E731
        rs, metrics, updated = jax.lax.cond(learn, updates, no_updates, rs)
        return (rs, ep_stats), (metrics, updated)

    def chunk(rs, chunk):
        iterations = chunk * iters_per_chunk + jnp.arange(iters_per_chunk)
        # carry: running sums of finished training episodes' returns and wins, and their count
        (rs, (r_sum, w_sum, count)), (metrics, updated) = jax.lax.scan(iteration_step, (rs, jnp.zeros(3)), iterations)
        metrics = jnp.where(updated.sum() > 0, (metrics * updated[:, None]).sum(axis=0) / updated.sum(), jnp.nan)
        train = {"train_return": r_sum / count, "train_win_rate": w_sum / count}
        train = jax.tree.map(lambda x: jnp.where(count > 0, x, jnp.nan), train)
        return rs, dict(zip(UPDATE_METRICS, metrics, strict=True)) | train

    def evaluate(actor, seed, global_step):
        """Mean return per agent and win rate of --num-eval-episodes episodes (stochastic policy, Sec. 5), discounted
        return and first states and actions (the critic check). The key depends only on (seed, global_step)."""
        key, k_reset = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), global_step))
        obs, state0, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, args.num_eval_episodes))

        def step(carry, key):
            obs, env_state, running, ret, won, disc, discount = carry
            k_act, k_env = jax.random.split(key)
            keys = jax.random.split(k_env, args.num_eval_episodes)
            action = act(actor, obs, k_act)
            out = jax.vmap(env_step)(keys, env_state, action)
            ret, won = ret + running * out["reward"].mean(axis=-1), won + running * out["won"]
            disc += discount * args.reward_scale * running * out["reward"].mean(axis=-1)
            carry = (out["obs"], out["state"], running * (1.0 - out["done"]), ret, won, disc, discount * args.gamma)
            return carry, action

        carry = (obs, env_state, *jnp.zeros((4, args.num_eval_episodes)).at[0].set(1.0), jnp.float32(1.0))
        (*_, ret, won, disc, _), actions = jax.lax.scan(step, carry, jax.random.split(key, env.episode_length))
        return ret.mean(), won.mean(), disc.mean(), state0, actions[0]

    def critic_value(critic, state, action):
        """The critic check: min(Q1, Q2)(s_0, a_i0) of the evaluation episodes' first step, mean over agents."""
        q = jax.vmap(lambda c, a: jnp.minimum(*critic_net.apply(c, state, a)))(critic, jnp.swapaxes(action, 0, 1))
        return q.mean()

    def probe(actor, seed):
        """PROBE_SAMPLES actions per agent (N, PROBE_SAMPLES, A) at one fixed reset state (as the DDPL scripts)."""
        k_reset, k_act = jax.random.split(jax.random.PRNGKey(seed))
        obs = jnp.broadcast_to(env.reset(k_reset)[0][:, None], (N, PROBE_SAMPLES, D))
        return jax.vmap(sample)(actor, obs, jax.random.split(k_act, N))

    steps_per_chunk, num_chunks = iters_per_chunk * E, num_iterations // iters_per_chunk
    return SimpleNamespace(init=init, chunk=chunk, evaluate=evaluate, critic_value=critic_value, probe=probe,
                           steps_per_chunk=steps_per_chunk, num_chunks=num_chunks)  # fmt: skip


# TRY NOT TO MODIFY: the run folder (config.json, metrics.csv, W&B, summary.json last), statistics, the learning curve.
# Identical text in every ddpl_*.py (tests/test_core_identity.py); a script leaves out the parts it never calls.
# --- harness: begin ---
class RunFolder:
    """runs/<run_name>/: config.json at once, metrics.csv and W&B at every log, summary.json last (else: unfinished)."""

    def __init__(self, args, env_id: str, columns: tuple[str, ...], labels: tuple[str, ...] = ()):
        self.args, self.start, self.rows, self.diverged = args, time.time(), [], {}
        self.dir = os.path.join(args.runs_dir, f"{env_id}__{args.exp_name}__{args.seed}__{int(self.start)}")
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        self.file = open(os.path.join(self.dir, "metrics.csv"), "w", newline="")
        columns = ("global_step", "seed", *labels, *columns, "sps", "wall_time")
        self.writer = csv.DictWriter(self.file, columns, extrasaction="ignore")
        self.writer.writeheader()
        wb = importlib.import_module("wandb") if args.track else None  # one W&B run for all seeds
        self.wandb = wb and wb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args))

    def log(self, global_step: int, seeds: list[int], metrics: dict, learner, sps: float, **labels) -> np.ndarray:
        """A row per seed (labels: the ablation's class, N); reports diverged seeds once. -> which never diverged"""
        metrics = {k: np.asarray(v, np.float64) for k, v in jax.device_get(metrics).items()}
        finite = np.all([np.isfinite(x).reshape(len(seeds), -1).all(1) for x in jax.tree.leaves(learner)], axis=0)
        tag = "".join(f"{v}/" for v in labels.values())
        for i, seed in enumerate(seeds):
            test = np.isinf if finite[i] else lambda x: ~np.isfinite(x)  # NaN losses alone: a chunk without updates
            bad = [k for k in ("critic_loss", "actor_loss", "q_mean") if k in metrics and test(metrics[k][i])]
            if (bad or not finite[i]) and (tag, seed) not in self.diverged:
                self.diverged[tag, seed] = {"seed": seed, "labels": tag, "global_step": global_step}
                bad = ", ".join(bad + ([] if finite[i] else ["parameters"]))
                tqdm.write(f"{tag}seed {seed} diverged at env step {global_step}: {bad} non-finite", sys.stderr)
            row = {"global_step": global_step, "seed": seed, **labels} | {k: float(v[i]) for k, v in metrics.items()}
            self.rows.append(row | {"sps": round(sps, 1), "wall_time": round(time.time() - self.start, 2)})
            self.writer.writerow(self.rows[-1])
        if self.wandb:  # every metric per seed ("seed3/episodic_return"), never averaged over seeds
            data = {f"{tag}seed{s}/{k}": v[i] for k, v in metrics.items() for i, s in enumerate(seeds)}
            self.wandb.log(data | {"global_step": global_step})
        self.file.flush()
        return np.array([(tag, seed) not in self.diverged for seed in seeds])

    def finish(self, summary: dict | None, panels: dict, title: str) -> int:
        """Draws the learning curve, writes summary.json (None: every seed diverged, so none). -> the exit code."""
        self.file.close()
        plot_curve(self.rows, os.path.join(self.dir, "learning_curve.png"), title, panels)
        if summary is not None:
            summary = {"script": os.path.basename(__file__), **summary, "diverged_seeds": list(self.diverged.values())}
            with open(os.path.join(self.dir, "summary.json"), "w") as f:
                json.dump(summary | {"wall_time_s": round(time.time() - self.start, 2)}, f, indent=2)
            finals = {k.replace("_", " "): v for k, v in summary.items() if k.startswith("final_") and "mean" in v}
            print(*(f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in finals.items()), sep="\n")
        if self.wandb:
            self.wandb.finish()
        print(f"wrote {self.dir}" + ("" if summary else ": every seed diverged, no summary.json"))
        return 1 if self.diverged else 0


def stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "per_seed": values.tolist()}


def plot_curve(rows: list[dict], path: str, title: str, panels: dict):
    """panels: {y label: {line label: (column, {column: value} the rows must match)}}; mean and std over seeds."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    fig = Figure(figsize=(5.5 * len(panels), 4), layout="tight")
    for ax, (ylabel, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        for (label, (column, where)), color in zip(lines.items(), ("tab:blue", "tab:orange", "tab:gray"), strict=False):
            rows_in = [r for r in rows if all(r[k] == v for k, v in where.items())]
            steps = sorted({r["global_step"] for r in rows_in})
            values = np.array([[r.get(column, np.nan) for r in rows_in if r["global_step"] == s] for s in steps])
            if steps and not np.all(np.isnan(values)):  # NaN (nothing logged) leaves a gap
                mean, std = np.nanmean(values, axis=1), np.nanstd(values, axis=1)
                ax.plot(steps, mean, "o-" if len(steps) == 1 else "-", color=color, label=label)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        ax.set(xlabel="environment steps per seed", ylabel=f"{ylabel} (mean, std over seeds)")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


# --- harness: end ---


def save_probes(probes: dict, dims: tuple[int, int], run_dir: str, title: str):
    """probes.npz, and probe.png (Fig. 4 right analogue): agents 0 and 1's actions per class and probe, seed lane 0."""
    from matplotlib.figure import Figure

    arrays = {f"{c}__{k}": np.asarray(v) for c, p in probes.items() for k, v in p.items()}  # <class>__steps, __actions
    np.savez(os.path.join(run_dir, "probes.npz"), **arrays)
    cols = max(len(probe["steps"]) for probe in probes.values())  # fewer for a class whose seeds all diverged
    fig = Figure(figsize=(2.6 * cols, 2.6 * len(probes)), layout="tight")
    axes = fig.subplots(len(probes), cols, squeeze=False)
    for row, (label, probe) in enumerate(probes.items()):
        for col, step in enumerate(probe["steps"]):
            for agent, color in ((0, "tab:blue"), (1, "tab:red")):
                a = probe["actions"][col, 0, min(agent, probe["actions"].shape[2] - 1)][:, list(dims)]
                axes[row][col].scatter(*a.T, s=2, alpha=0.3, color=color, label=f"agent {agent}")
            axes[row][col].set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xticks=[], yticks=[])
            axes[row][col].set_title(f"{label}, {step:,} steps", fontsize=8)
        for ax in axes[row][len(probe["steps"]) :]:  # probes a diverged class did not take
            ax.set_axis_off()
    axes[0][0].legend(fontsize=7, markerscale=4)
    fig.suptitle(f"{title}: action dims {dims[0]} (x) and {dims[1]} (y) at the probe state, seed lane 0")
    fig.savefig(os.path.join(run_dir, "probe.png"), dpi=100)


def plot_success(success: dict, solved: dict, path: str, args: Args):
    """--env toy: success rate (every agent at goal at the end of an evaluation episode) against N, per class; the
    legend counts the seeds that solved the game at each N (final return per agent >= TOY_SOLVED_RETURN)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), layout="tight")
    ax = fig.subplots()
    ns = sorted(int(n) for n in next(iter(success.values())))
    ax.plot(ns, [TOY["p_goal"] ** n for n in ns], "k--", lw=1, label="optimal policy (p^N)")
    for label, color in zip(success, ("tab:blue", "tab:orange"), strict=False):  # None: every seed diverged
        mean, std = ([(success[label][str(n)] or {}).get(k, np.nan) for n in ns] for k in ("mean", "std"))
        counts = "seeds solved per N: " + ", ".join(str(solved[label][str(n)]) for n in ns)  # None: all diverged
        ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, color=color, label=f"{label}, {counts}")
    ax.set(xlabel="number of agents N", xticks=ns, ylim=(-0.05, 1.05))
    ax.set_ylabel(f"success rate (mean, std of {args.num_seeds} seeds)")
    ax.set_title(f"Toy game, Algorithm 2, {args.total_timesteps:,} env steps per seed", fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=100)


def class_statistics(args: Args, name: str, returns: list, wins: list, ok, sps: float, n=None) -> dict | None:
    """One class's (and N's) summary statistics over its healthy seeds (ok), printed; None if every seed diverged."""
    if not ok.any():
        print(f"{name}: every seed diverged")
        return None
    best = max(returns, key=lambda r: r[ok].mean())  # Table 1: the chunk with the best mean eval return
    result = {"final_eval_return": stats(returns[-1][ok]), "best_eval_return": stats(best[ok]), "sps": round(sps, 1)}
    result |= {"final_win_rate": stats(wins[-1][ok])} if args.env != "mpe" else {}
    if args.env == "toy":  # count solves by return (a policy can sit on a* with a goal policy worth nothing)
        solved = returns[-1][ok] / n >= TOY_SOLVED_RETURN  # the return is the team's: the sum over the N copies
        result |= {"solved": int(solved.sum()), "success_seeds": int((wins[-1][ok] > 0).sum())}
    finals = [f"{k.replace('_', ' ')} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in result.items() if "final" in k]
    solved = f", solved {result['solved']} of {ok.sum()} seeds" if "solved" in result else ""
    print(f"{name}: {', '.join(finals)}{solved}")
    return result


def summarise(args: Args, env_id: str, results: dict, classes: list, agent_counts: tuple, total: int):
    """-> (summary: the last class's statistics at the top level (the Gaussian with --compare) and `comparison`, on
    the toy success rate and final return per class and N instead; the learning curve's panels; its title)."""
    summary = {"env_id": env_id, "policy": classes[-1], "total_timesteps": total, "num_seeds": args.num_seeds}
    summary |= {"num_devices": jax.local_device_count()} | (results[classes[-1], agent_counts[-1]] or {})
    if args.env == "toy":  # per class and N: success rate and return at the last evaluation, per seed
        per_n = lambda k: {c: {str(n): results[c, n] and results[c, n][k] for n in agent_counts} for c in classes}  # noqa: E731
        summary |= {"toy_agents": list(agent_counts), "success_rate": per_n("final_win_rate")}
        summary |= {"solved": per_n("solved"), "success_seeds": per_n("success_seeds")}  # counts of seeds
        summary["final_eval_return"] = per_n("final_eval_return")
        summary.pop("final_win_rate", None), summary.pop("best_eval_return", None)
    elif args.compare:  # one row per class, the same seeds and budget
        summary["comparison"] = {label: results[label, None] for label in classes}
    where = {"num_agents": agent_counts[-1]} if args.env == "toy" else {}  # the toy's learning curves: the largest N
    ret = "eval team return (every agent's reward)" if args.env == "toy" else "eval return per agent"
    panels = {ret: {c: ("episodic_return", {"policy": c} | where) for c in classes}}
    if wins := {"smax": "eval win rate", "toy": "eval success rate"}.get(args.env):
        panels[wins] = {c: ("win_rate", {"policy": c} | where) for c in classes}
    return summary, panels, f"DDPL policy classes on {env_id}" + (f", N = {agent_counts[-1]}" if where else "")


def validate(args: Args) -> str | None:
    """The first invalid flag that tyro cannot check, as a one-line message (None: all valid)."""
    if args.env == "toy" and (not args.toy_agents or min(args.toy_agents) < 1):
        return f"--toy-agents must be numbers of agents >= 1, got {args.toy_agents}"
    if not 0 <= args.issm_batch_size <= args.batch_size:
        return f"--issm-batch-size must be 0 (--batch-size // M) or 1..--batch-size, got {args.issm_batch_size}"
    if not (0 <= args.target_ess < 1 and 0 <= args.proposal_mix < 1):  # target_ess 0: fixed eta; mix 0: all from pi^t
        return f"need 0 <= --target-ess < 1 and 0 <= --proposal-mix < 1, got {args.target_ess}, {args.proposal_mix}"
    minimum = dict.fromkeys(("num_seeds", "num_envs", "batch_size", "hidden_size", "num_diffusion_steps"), 1)
    minimum |= {"num_eval_episodes": 1, "updates_per_iteration": 0, "learning_starts": 0, "buffer_size": args.num_envs}
    minimum |= {"num_action_samples": 2}  # ISSM's weights are normalised over each state's M >= 2 proposals
    for name, low in minimum.items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
    if not args.num_envs <= args.eval_every <= args.total_timesteps:
        got = f"{args.num_envs}, {args.eval_every}, {args.total_timesteps}"
        return f"need --num-envs <= --eval-every <= --total-timesteps, got {got}"
    chunk = args.eval_every // args.num_envs * args.num_envs  # env steps per chunk
    if args.probe_every < 0 or args.probe_every % chunk:
        return f"--probe-every must be 0 or a multiple of the chunk ({chunk} env steps: --eval-every, whole iterations)"
    positive = min(args.tau, args.learning_rate, args.learning_rate_end) > 0 and args.eta >= 0
    if not (0 <= args.gamma <= 1 and args.tau <= 1 and positive):
        return "need 0 <= --gamma <= 1, 0 < --tau <= 1, --eta >= 0, --learning-rate and --learning-rate-end > 0"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track needs the wandb package (pip install wandb), which is not installed"
    if args.num_seeds % (n := jax.local_device_count()):  # the seed axis is split evenly over the local devices
        return f"--num-seeds {args.num_seeds} is not a multiple of the {n} local {jax.default_backend()} devices"
    return None


def parse_cli() -> Args:
    """tyro.cli(Args), with TOY_DEFAULTS as the defaults when the command line says --env toy (explicit flags win)."""
    argv = sys.argv[1:]
    toy = "--env=toy" in argv or any(a == "--env" and b == "toy" for a, b in zip(argv, argv[1:], strict=False))
    return tyro.cli(Args, default=TOY_DEFAULTS if toy else Args())


def main(args: Args) -> int:
    if error := validate(args):  # nothing is written before the flags are known to be valid
        print(f"error: {error}", file=sys.stderr)
        return 2
    # TRY NOT TO MODIFY: for each N (the toy's) and policy class: build and compile; each chunk: train, evaluate, log,
    # probe, progress; the class's statistics. Then the probes, summary and figures
    env_id, toy = {"smax": f"SMAX_{args.map}", "toy": "toy"}.get(args.env, args.env_id), args.env == "toy"
    gaussian = f"gaussian-{args.projection}"
    classes = ["diffusion", gaussian] if args.compare else ["diffusion" if args.policy == "diffusion" else gaussian]
    agent_counts = args.toy_agents if toy else (None,)  # the toy trains every N in turn; the others their env's
    columns = tuple(m for m in METRICS if args.env != "mpe" or "win" not in m)  # MPE has no wins
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    lanes = NamedSharding(Mesh(np.array(jax.local_devices()), ("seed",)), PartitionSpec("seed"))  # seeds over devices
    seed_ids = jax.device_put(jnp.array(seeds, jnp.int32), lanes)
    print("seeds per device:", {str(s.device): np.asarray(s.data).tolist() for s in seed_ids.addressable_shards})
    run = RunFolder(args, env_id, columns, labels=("policy", "num_agents") if toy else ("policy",))
    results, probes = {}, {}  # results[class, N]: class_statistics; N is None except on the toy
    for n in agent_counts:
        env = ToyArrays(n) if toy else MPEGlue(args) if args.env == "mpe" else SMAXArrays(args.map)  # N: the toy's
        for policy in classes:
            labels = {"policy": policy} | ({"num_agents": n} if toy else {})  # divergence is per (class, N, seed)
            name = policy if n is None else f"{policy}, N = {n}"
            start, train = time.time(), make_train(args, env, "diffusion" if policy == "diffusion" else "gaussian")
            rs = jax.jit(jax.vmap(train.init), out_shardings=lanes)(seed_ids)
            train_chunk = jax.jit(jax.vmap(train.chunk, (0, None)), out_shardings=lanes, donate_argnums=0)
            train_chunk = train_chunk.lower(rs, jnp.int32(0)).compile()
            evaluate = jax.jit(jax.vmap(train.evaluate, (0, 0, None)))
            critic_value, probe = jax.jit(jax.vmap(train.critic_value)), jax.jit(jax.vmap(train.probe))
            total = train.num_chunks * train.steps_per_chunk
            print(f"{name}: compiled in {time.time() - start:.0f} s; {train.num_chunks} chunks, {total} steps per seed")
            probe_steps = [0] if args.probe_every else []  # before the first update, then every --probe-every steps
            actions = [np.asarray(probe(rs["learner"]["actor"], seed_ids))] if args.probe_every else []
            start, returns, wins = time.time(), [], []
            bar = tqdm(total=total, unit="step", desc=f"{name}, {args.num_seeds} seed(s)")
            for chunk in range(train.num_chunks):
                rs, metrics = train_chunk(rs, jnp.int32(chunk))  # --eval-every env steps per seed in one lax.scan
                global_step = (chunk + 1) * train.steps_per_chunk
                ret, win, disc, state, action = evaluate(rs["learner"]["actor"], seed_ids, jnp.int32(global_step))
                q_first = critic_value(rs["learner"]["critic"], state, action)  # the critic check against disc_return
                metrics |= {"episodic_return": ret, "win_rate": win, "q_first": q_first, "disc_return": disc}
                metrics, sps = {k: v for k, v in metrics.items() if k in columns}, global_step / (time.time() - start)
                ok = run.log(global_step, seeds, metrics, rs["learner"], sps, **labels)
                returns.append(np.asarray(ret))
                wins.append(np.asarray(win))
                if args.probe_every and global_step % args.probe_every == 0:
                    probe_steps.append(global_step)
                    actions.append(np.asarray(probe(rs["learner"]["actor"], seed_ids)))
                bar.update(train.steps_per_chunk)
                if not ok.any():
                    break  # every seed of this class (and N) diverged; the next one trains
                bar.set_postfix(eval=f"{returns[-1][ok].mean():.2f}")
            bar.close()
            if probe_steps:  # (probe, seed, agent, sample, action dim)
                probes[name] = {"steps": probe_steps, "actions": np.stack(actions)}
            results[policy, n] = class_statistics(args, name, returns, wins, ok, sps, n)
    if probes:  # SMAX: P(move), angle; MPE: left and right force
        save_probes(probes, {"smax": (1, 3), "mpe": (1, 2), "toy": (0, 0)}[args.env], run.dir, env_id)
    summary, panels, title = summarise(args, env_id, results, classes, agent_counts, total)
    if toy:
        plot_success(summary["success_rate"], summary["solved"], os.path.join(run.dir, "success_vs_agents.png"), args)
    return run.finish(summary if any(results.values()) else None, panels, title)


if __name__ == "__main__":
    sys.exit(main(parse_cli()))
