"""DDPL's policy-class ablation (arXiv 2605.07101, Sec. 5 "Ablation study", Fig. 4): diffusion vs Gaussian policies.

The same Algorithm 2 loop, averaged-Q critics, replay buffer and hyperparameters as ddpl_mpe.py and ddpl_smax.py;
only the policy class changes. `--policy gaussian` (the default) uses a tanh-squashed diagonal Gaussian per agent,
projected onto the same DecSPG target pi^t exp(eta Qbar_i) by reverse KL (`--projection reverse`, the paper's
Thm 3.1) or by weighted maximum likelihood on the ISSM weights (`--projection forward`, ours). `--policy diffusion`
is DDPL itself. `--compare` trains both classes with the same seeds and budget and draws them in one figure;
`--probe-every` records the action distribution at a fixed state during training (the Fig. 4 right analogue).
`--env toy` runs the paper's N-agent toy game of Sec. 3 through Algorithm 2 and reports success against N.
Flags, metrics, choices and measured numbers: docs/ddpl_gaussian_ablation.md.
"""

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxmarl
import numpy as np
import optax
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxmarl.environments.smax import map_name_to_scenario
from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO
from jaxmarl.registration import registered_envs

NOISE_SCHEDULES = ("linear", "cosine", "vp")
WEIGHT_RULES = ("state", "batch", "raw")  # --weight-rule: the scale of Qbar in the ISSM softmax
ENVS, POLICIES, PROJECTIONS = ("mpe", "smax", "toy"), ("gaussian", "diffusion"), ("reverse", "forward")
UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta", "action_std")
PROBE_SAMPLES = 512  # actions drawn per agent and probe


@dataclass
class Args:
    exp_name: str = "ddpl_gaussian_ablation"
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 0
    """seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)"""
    num_seeds: int = 1
    """independent runs, vmapped in one process; the seed axis is split over all local devices (a multiple of them)"""
    track: bool = False
    """log to Weights & Biases as well (one W&B run per seed and policy class)"""
    wandb_project_name: str = "ddpl"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team); None: your default"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""

    # What is compared
    env: str = "mpe"
    """mpe (JaxMARL MPE, --env-id), smax (HeuristicEnemySMAX, --map) or toy (the paper's N-agent toy game,
    --toy-agents; with --env toy the other flags default to TOY_DEFAULTS, shown by --env toy --help)"""
    env_id: str = "MPE_simple_reference_v3"
    """with --env mpe: a JaxMARL MPE scenario that accepts action_type="Continuous" (as ddpl_mpe.py)"""
    map: str = "3s_vs_5z"
    """with --env smax: an SMAX map (as ddpl_smax.py)"""
    toy_agents: tuple[int, ...] = (1, 2, 3, 4)
    """with --env toy: the numbers of agents N, each trained (both classes with --compare) and evaluated in turn"""
    policy: str = "gaussian"
    """gaussian (the ablation) or diffusion (DDPL); ignored with --compare, which trains both"""
    projection: str = "reverse"
    """how the Gaussian follows pi^t exp(eta Qbar): reverse (KL(pi_theta || target), the paper's) or forward (ours)"""
    compare: bool = False
    """train DDPL and the Gaussian variant with the same seeds and budget, one after the other, and compare them"""
    probe_every: int = 0
    """env steps between probes of the action distribution at a fixed state (0: off); a multiple of --eval-every"""

    # Algorithm specific arguments (the DDPL scripts' defaults)
    total_timesteps: int = 2_000_000
    """environment steps per seed (each of the --num-envs envs counts)"""
    num_envs: int = 20
    """parallel envs, each stepped once per iteration (Table 3 "rollout batch size")"""
    buffer_size: int = 200_000
    """replay buffer capacity in transitions (ours); circular"""
    learning_starts: int = 10_000
    """environment steps of uniform random actions before the first update (ours)"""
    updates_per_iteration: int = 1
    """U: gradient updates after each vector step (ours)"""
    batch_size: int = 256
    """transitions per update (Table 3)"""
    gamma: float = 0.99
    """discount factor (ours)"""
    tau: float = 0.005
    """Polyak rate of the target critics (Table 3 "smoothing parameter")"""
    learning_rate: float = 1e-4
    """Adam learning rate of actors and critics at the start, decayed linearly (Table 3)"""
    learning_rate_end: float = 5e-5
    """Adam learning rate at the last update (Table 3)"""
    hidden_size: int = 256
    """width of the 3 mish layers of score networks, Gaussian actors and critics (Table 3)"""
    num_diffusion_steps: int = 20
    """K: denoising steps of the diffusion policies (Table 3)"""
    noise_schedule: str = "cosine"
    """linear, cosine or vp (ours: cosine, as the DDPL scripts)"""
    eta: float = 1.0
    """DecSPG step eta of the target pi^t exp(eta Qbar) (Table 3), for both classes"""
    num_action_samples: int = 4
    """M: actions per state for ISSM, the reverse-KL expectation and the forward fit (ours); >= 2"""
    issm_batch_size: int = 0
    """B_p: states of the batch that train the policy step, both classes (ours; the critic step uses all B);
    0: batch_size // num_action_samples, as the DDPL scripts"""
    weight_rule: str = "state"
    """Qbar's scale in the ISSM softmax (ours, ALGORITHM.md sec. 4): state (each state's std over its M samples),
    batch (one running scale for all states: the mean within-state std), raw (Qbar as it is)"""
    target_ess: float = 0.0
    """0: fixed eta; in (0, 1): eta adapts so the weights' mean effective sample size / M holds at this target"""
    reward_scale: float = 1.0
    """multiplies rewards in the TD target (ours)"""
    team_reward: bool = True
    """MPE: critics learn the mean reward over agents (identical interest); SMAX's reward is one team reward"""
    eval_every: int = 20_000
    """environment steps between evaluations (one jitted chunk of training each)"""
    num_eval_episodes: int = 50
    """episodes per seed and evaluation, stochastic policy (paper Sec. 5)"""


# the toy game's parameters: toy_failure_mode.py's defaults (tests/test_gaussian_ablation.py checks they agree)
TOY = {"bump_reward": 1.0, "bump_width": 0.1, "a_star": 0.8, "delta": 0.1, "p_goal": 0.5}
TOY |= {"goal_reward": 1.0, "goal_action": -0.5, "goal_width": 0.1}
TOY_HORIZON = 10  # steps per toy episode (ours): s0 is left at the first step; gamma^10 = 0.35 of the rest bootstraps
# --env toy's defaults (ours): toy_failure_mode.py's discount and 5 seeds, networks and a budget that train N = 1..4
# for both classes in about 10 minutes of a 2-core CPU (docs/ddpl_gaussian_ablation.md, "The toy game")
TOY_DEFAULTS = Args(
    env="toy", num_seeds=5, total_timesteps=20_000, num_envs=8, buffer_size=20_000, learning_starts=2_000,
    batch_size=128, gamma=0.9, tau=0.02, learning_rate=1e-3, learning_rate_end=1e-4, hidden_size=64,
    num_diffusion_steps=10, eval_every=5_000, num_eval_episodes=100,
)  # fmt: skip


def parse_args() -> Args:
    """tyro.cli(Args), with tyro's boxed multi-line parse errors condensed to one line on stderr (exit 2)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            pre = argparse.ArgumentParser(add_help=False)  # --env first: it picks the defaults
            pre.add_argument("--env")
            return tyro.cli(Args, default=TOY_DEFAULTS if pre.parse_known_args()[0].env == "toy" else Args())
    except SystemExit as e:
        if e.code:
            lines = [ln.strip("│╭╮╰╯─ ") for ln in err.getvalue().splitlines()][1:]  # the box's first paragraph
            message = " ".join(lines[: lines.index("")] if "" in lines else lines) or "invalid command line"
            print(f"error: {message} (see --help)", file=sys.stderr)
        raise


def is_continuous_mpe(env_id: str) -> bool:
    """A registered JaxMARL MPE scenario whose constructor accepts action_type="Continuous"."""
    if not env_id.startswith("MPE_") or env_id not in registered_envs:
        return False
    try:
        return bool(jaxmarl.make(env_id, action_type="Continuous"))
    except Exception:  # e.g. the facmac scenarios: continuous already, but they reject the keyword
        return False


def validate(args: Args) -> str | None:
    """Return a one-line description of the first invalid flag, or None. Runs before anything is written."""
    choices = {"env": ENVS, "policy": POLICIES, "projection": PROJECTIONS, "noise_schedule": NOISE_SCHEDULES}
    for name, valid in choices.items():
        if getattr(args, name) not in valid:
            return f"--{name.replace('_', '-')}: unknown {getattr(args, name)!r}; choose from {', '.join(valid)}"
    if args.env == "mpe" and not is_continuous_mpe(args.env_id):
        valid = [e for e in registered_envs if is_continuous_mpe(e)]
        return f"--env-id: unknown {args.env_id!r}; valid ids: {', '.join(valid)}"
    if args.env == "smax" and args.map not in MAP_NAME_TO_SCENARIO:
        return f"--map: unknown SMAX map {args.map!r}; valid maps: {', '.join(sorted(MAP_NAME_TO_SCENARIO))}"
    if args.env == "toy" and (not args.toy_agents or min(args.toy_agents) < 1):
        return f"--toy-agents must be numbers of agents >= 1, got {args.toy_agents}"
    if not 0 <= args.issm_batch_size <= args.batch_size:
        return f"--issm-batch-size must be 0 (--batch-size // M) or 1..--batch-size, got {args.issm_batch_size}"
    if args.weight_rule not in WEIGHT_RULES:
        return f"--weight-rule: unknown {args.weight_rule!r}; choose from {', '.join(WEIGHT_RULES)}"
    if not 0 <= args.target_ess < 1:
        return f"--target-ess must be 0 (fixed eta) or in (0, 1), got {args.target_ess}"
    if args.num_action_samples < 2:
        return f"--num-action-samples must be >= 2 (per-state normalised weights), got {args.num_action_samples}"
    minimum = dict.fromkeys(("num_seeds", "num_envs", "batch_size", "hidden_size", "num_diffusion_steps"), 1)
    minimum |= {"num_eval_episodes": 1, "updates_per_iteration": 0, "learning_starts": 0, "buffer_size": args.num_envs}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
    if not args.num_envs <= args.eval_every <= args.total_timesteps:
        got = f"{args.num_envs}, {args.eval_every}, {args.total_timesteps}"
        return f"need --num-envs <= --eval-every <= --total-timesteps, got {got}"
    chunk = args.eval_every // args.num_envs * args.num_envs  # env steps per chunk
    if args.probe_every < 0 or args.probe_every % chunk:
        return f"--probe-every must be 0 or a multiple of the chunk ({chunk} env steps: --eval-every, whole iterations)"
    if not (0 <= args.gamma <= 1 and 0 < args.tau <= 1 and args.eta >= 0 and args.learning_rate > 0):
        return "need 0 <= --gamma <= 1, 0 < --tau <= 1, --eta >= 0 and --learning-rate > 0"
    if args.learning_rate_end <= 0:
        return "--learning-rate-end must be > 0"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track needs the wandb package (pip install wandb), which is not installed"
    return None


# ALGO LOGIC: environment glue. Both envs are seen through one interface: obs (N, obs_dim) per agent, a global state
# for the critics, learner actions in [-1, 1]^(N, act_dim), rewards (N,), and the transition's flags.
class MPEArrays:
    """A JaxMARL MPE env (ddpl_mpe.py's glue): the global state is all observations concatenated, episodes end only
    at the time limit (never terminal), nobody dies. Smaller observations or actions are zero-padded."""

    def __init__(self, env_id: str, team_reward: bool):
        self.env, self.team_reward = jaxmarl.make(env_id, action_type="Continuous"), team_reward
        self.agents = self.env.agents
        self.num_agents = len(self.agents)
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [self.env.action_space(a).shape[0] for a in self.agents]
        self.obs_dim, self.act_dim = max(self.obs_dims), max(self.act_dims)
        self.state_dim = self.num_agents * self.obs_dim
        self.low = [jnp.broadcast_to(jnp.asarray(self.env.action_space(a).low, jnp.float32), (d,))
                    for a, d in zip(self.agents, self.act_dims, strict=True)]  # fmt: skip
        self.high = [jnp.broadcast_to(jnp.asarray(self.env.action_space(a).high, jnp.float32), (d,))
                     for a, d in zip(self.agents, self.act_dims, strict=True)]  # fmt: skip
        self.episode_length = self.env.max_steps + 1  # done is raised when step >= max_steps: 26 steps

    def stack_obs(self, obs: dict) -> jax.Array:
        dims = zip(self.agents, self.obs_dims, strict=True)
        return jnp.stack([jnp.pad(obs[a], (0, self.obs_dim - d)) for a, d in dims])

    def reset(self, key):
        obs, state = self.env.reset(key)
        obs = self.stack_obs(obs)
        return obs, obs.reshape(-1), state

    def step(self, key, state, action) -> dict:
        """One step of one env, keeping the true last observation (see ddpl_mpe.py's MPEArrays.step)."""
        env_action = {
            a: lo + 0.5 * (action[i, :d] + 1.0) * (hi - lo)
            for i, (a, d, lo, hi) in enumerate(zip(self.agents, self.act_dims, self.low, self.high, strict=True))
        }
        key, key_reset = jax.random.split(key)
        obs_st, state_st, reward, dones, _ = self.env.step_env(key, state, env_action)
        obs_re, _, state_re = self.reset(key_reset)
        done = dones["__all__"]
        next_obs = self.stack_obs(obs_st)
        reward = jnp.stack([reward[a] for a in self.agents])
        obs = jnp.where(done, obs_re, next_obs)
        return {
            "next_obs": next_obs,
            "next_world_state": next_obs.reshape(-1),
            "reward": jnp.full_like(reward, reward.mean()) if self.team_reward else reward,
            "terminal": jnp.float32(0.0),  # time-limit ends only: truncation, never termination
            "done": done,
            "won": jnp.bool_(False),
            "alive": jnp.ones(self.num_agents, bool),
            "next_alive": jnp.ones(self.num_agents, bool),
            "obs": obs,
            "world_state": obs.reshape(-1),
            "state": jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st),
        }


class SMAXArrays:
    """HeuristicEnemySMAX with continuous actions (ddpl_smax.py's glue): the critics see the env's world state, one
    team reward, terminal when a team is wiped out, win = all enemies dead with an ally alive."""

    ACTION_EPS = 1e-3  # env actions stay in [eps, 1 - eps]: the env samples move-vs-shoot from log(a), log(1 - a)

    def __init__(self, map_name: str):
        scenario = map_name_to_scenario(map_name)
        self.env = jaxmarl.make("HeuristicEnemySMAX", scenario=scenario, action_type="continuous")
        self.agents = self.env.agents
        self.num_agents = self.env.num_allies
        self.obs_dim = self.env.observation_space(self.agents[0]).shape[0]
        self.state_dim = (self.env.num_allies + self.env.num_enemies) * len(self.env.own_features)  # every unit
        self.act_dim = len(self.env.continuous_action_dims)  # 4
        self.episode_length = self.env.max_steps + 1  # at most 101 steps

    def critic_state(self, state) -> jax.Array:
        """The critics' input: every unit's features as SMAX builds them for a unit's own observation (health,
        position / map size, weapon cooldown / its maximum clipped to [0, 1], type one-hot; zeros when dead).
        The env's world_state has the same features unscaled (positions 0-32, cooldowns drifting to about -50)
        plus constant team and type ids: critics on it start with offsets larger than the whole return."""
        units = jnp.arange(self.env.num_allies + self.env.num_enemies)
        return jax.vmap(self.env._get_own_features, (None, 0))(state.state, units).reshape(-1)

    def alive(self, state) -> jax.Array:
        return state.state.unit_alive[: self.num_agents]  # allies first, then enemies

    def reset(self, key):
        obs, state = self.env.reset(key)
        state = jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), state)  # strong types: one compile
        return jnp.stack([obs[a] for a in self.agents]), self.critic_state(state), state

    def step(self, key, state, action) -> dict:
        """One step of one env, keeping the true last observation and the win (see ddpl_smax.py's SMAXArrays.step)."""
        eps = self.ACTION_EPS
        env_action = jnp.clip(eps + (1.0 - 2.0 * eps) * 0.5 * (action + 1.0), eps, 1.0 - eps)  # the env doesn't clip
        key, key_reset = jax.random.split(key)
        obs_st, state_st, reward, dones, _ = self.env.step_env(
            key, state, {a: env_action[i] for i, a in enumerate(self.agents)}
        )
        obs_re, world_state_re, state_re = self.reset(key_reset)
        done = dones["__all__"]
        alive = state_st.state.unit_alive
        allies_dead, enemies_dead = ~alive[: self.num_agents].any(), ~alive[self.num_agents :].any()
        next_obs = jnp.stack([obs_st[a] for a in self.agents])
        return {
            "next_obs": next_obs,
            "next_world_state": self.critic_state(state_st),
            "reward": jnp.full(self.num_agents, reward[self.agents[0]]),  # one team reward
            "terminal": (allies_dead | enemies_dead).astype(jnp.float32),
            "done": done,
            "won": enemies_dead & ~allies_dead,
            "alive": self.alive(state),
            "next_alive": self.alive(state_st),
            "obs": jnp.where(done, obs_re, next_obs),
            "world_state": jnp.where(done, world_state_re, self.critic_state(state_st)),
            "state": jax.tree.map(lambda r, s: jax.lax.select(done, r, s), state_re, state_st),
        }


class ToyArrays:
    """The paper's N-agent toy game (Sec. 3.2.2, toy_failure_mode.py's parameters) as a JAX env for Algorithm 2.

    Each agent has its own copy of the MDP of Sec. 3.2.1: in s0 the reward is c0 exp(-a^2 / 2 w0^2) (the easy bump)
    and the copy moves to goal with probability p 1{|a - a*| <= delta}, else to sink; goal is absorbing with reward
    R_g exp(-(a - a_g)^2 / 2 w_g^2), sink absorbing with 0. The team reward is the sum over the copies. An agent
    observes its own copy's state (one-hot s0 / goal / sink); the critics see all of them. Episodes end by the time
    limit (truncation); "won": every copy is at goal when the episode ends (the success of issue 18).
    """

    def __init__(self, num_agents: int):
        self.num_agents, self.obs_dim, self.act_dim = num_agents, 3, 1
        self.state_dim, self.episode_length = 3 * num_agents, TOY_HORIZON
        self.agents = [f"agent_{i}" for i in range(num_agents)]

    def reset(self, key):
        state = {"pos": jnp.zeros(self.num_agents, jnp.int32), "t": jnp.int32(0)}  # 0: s0, 1: goal, 2: sink
        obs = jax.nn.one_hot(state["pos"], 3)
        return obs, obs.reshape(-1), state

    def step(self, key, state, action) -> dict:
        p, a, pos = TOY, action[:, 0], state["pos"]
        bump = p["bump_reward"] * jnp.exp(-(a**2) / (2 * p["bump_width"] ** 2))
        goal = p["goal_reward"] * jnp.exp(-((a - p["goal_action"]) ** 2) / (2 * p["goal_width"] ** 2))
        hit = jax.random.uniform(key, a.shape) < p["p_goal"] * (jnp.abs(a - p["a_star"]) <= p["delta"])
        reward = jnp.where(pos == 0, bump, jnp.where(pos == 1, goal, 0.0)).sum()  # one team reward: the sum
        next_pos = jnp.where(pos == 0, jnp.where(hit, 1, 2), pos)
        done = state["t"] + 1 >= self.episode_length
        next_obs = jax.nn.one_hot(next_pos, 3)
        obs_re, _, state_re = self.reset(key)
        obs = jnp.where(done, obs_re, next_obs)
        return {
            "next_obs": next_obs,
            "next_world_state": next_obs.reshape(-1),
            "reward": jnp.full(self.num_agents, reward),
            "terminal": jnp.float32(0.0),  # time-limit ends only: truncation
            "done": done,
            "won": done & (next_pos == 1).all(),
            "alive": jnp.ones(self.num_agents, bool),
            "next_alive": jnp.ones(self.num_agents, bool),
            "obs": obs,
            "world_state": obs.reshape(-1),
            "state": jax.tree.map(lambda r, s: jnp.where(done, r, s), state_re, {"pos": next_pos, "t": state["t"] + 1}),
        }


def make_env(args: Args, num_agents: int = 1):
    if args.env == "toy":
        return ToyArrays(num_agents)
    return SMAXArrays(args.map) if args.env == "smax" else MPEArrays(args.env_id, args.team_reward)


def buffer_init(size: int, N: int, D: int, S: int, A: int) -> dict:
    """Fixed-size replay arrays for N agents, D-dim observations, an S-dim global state and A-dim actions."""
    shapes = {"obs": (N, D), "world_state": (S,), "action": (N, A), "reward": (N,), "next_obs": (N, D)}
    shapes |= {"next_world_state": (S,), "terminal": (), "alive": (N,), "next_alive": (N,)}
    return {name: jnp.zeros((size, *shape)) for name, shape in shapes.items()}


def buffer_add(buffer: dict, transitions: dict, iteration) -> dict:
    """Circular insert of one vector step (E transitions) at rows iteration * E, ..., mod the buffer size."""
    size, num = buffer["terminal"].shape[0], transitions["terminal"].shape[0]
    rows = (iteration * num + jnp.arange(num)) % size
    return jax.tree.map(lambda b, x: b.at[rows].set(x.astype(b.dtype)), buffer, transitions)


# ALGO LOGIC: the Gaussian policy class (ALGORITHM.md sec. 7): a = tanh(u), u ~ N(mu(o), diag sigma(o)^2), as SAC
# and HASAC squash (a clipped Gaussian's samples past the box carry no Q gradient and freeze the mean there)
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


def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag exp(log_std)^2), summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def squashed_log_prob(u, mean, log_std):
    """log density of a = tanh(u) under the squashed Gaussian: log N(u) - sum log(1 - tanh(u)^2), stably."""
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))  # log(1 - tanh(u)^2)
    return gaussian_log_prob(u, mean, log_std) - jnp.sum(log_det, axis=-1)


def alive_issm_weights(weights, alive):
    """ISSM weights (B, M) with rows where the agent is dead at s left out (ddpl_smax.py): mean over the living."""
    return weights * alive[:, None] * alive.shape[0] / jnp.maximum(alive.sum(), 1.0)


def living_mean(x, alive):
    """Mean of x (B,) over the rows where the agent is alive."""
    return (x * alive).sum() / jnp.maximum(alive.sum(), 1.0)


def make_policy(args: Args, policy: str, A: int):
    """The policy class: init(key, D), sample(params, obs, key) -> actions in [-1, 1], and
    actor_loss(params, old_params, obs, alive, q_fn, temp, key) -> (loss, (temp, [max_weight, ess, eta, action_std])).

    old_params is pi^t, the parameters before this update (no gradient flows into them); q_fn(actions (B, M, A)) gives
    Qbar_i(s, a) (B, M) from the just-updated online critics; alive (B,) in {0, 1} masks rows where the agent is dead;
    temp is issm_temperature's state: both classes see Qbar through the same --weight-rule and eta.
    """
    M = args.num_action_samples
    temperature = (args.weight_rule, args.eta, args.target_ess)  # issm_temperature's arguments, both classes
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
            # min_theta E_{a ~ pi_theta}[log pi_theta(a|o) - log pi^t(a|o) - eta Qbar(s, a)], reparameterised (Thm 3.1).
            # The same u gives a under both policies, so tanh's log-det cancels in the ratio; at theta = theta^t the
            # ratio's expected gradient is zero and one step is Q ascent (docs/ddpl_gaussian_ablation.md)
            u = mean[:, None] + jnp.exp(log_std)[:, None] * eps
            x = jnp.tanh(u)
            q = q_fn(x)
            weights, temp, ess, eta = issm_temperature(temp, jax.lax.stop_gradient(q), *temperature, alive)
            log_ratio = squashed_log_prob(u, mean[:, None], log_std[:, None])
            log_ratio -= squashed_log_prob(u, old_mean[:, None], old_log_std[:, None])
            loss = jnp.mean(mask * (log_ratio - eta * scaled(q, temp)))
        else:
            # forward KL (ours): weighted maximum likelihood of M actions from pi^t with the self-normalised weights
            u = jax.lax.stop_gradient(old_mean[:, None] + jnp.exp(old_log_std)[:, None] * eps)  # a = tanh(u)
            x = jnp.tanh(u)
            weights, temp, ess, eta = issm_temperature(temp, q_fn(x), *temperature, alive)
            log_lik = squashed_log_prob(u, mean[:, None], log_std[:, None])
            loss = -jnp.mean(jnp.sum(alive_issm_weights(weights, alive) * log_lik, axis=-1))
        stats = [living_mean(weights.max(-1), alive), ess, eta, x.std(axis=1).mean()]  # x's spread: as for diffusion
        return loss, (temp, jnp.stack(stats))

    return init, sample, actor_loss


# --- DDPL core: begin ---
# Identical text in every ddpl_*.py and toy_failure_mode.py (tests/test_core_identity.py). ALGORITHM.md sec. 3-5.
def make_noise_schedule(name: str, num_steps: int) -> dict:
    """Betas b_1..b_K and the DDPM coefficients derived from them (ALGORITHM.md sec. 3)."""
    K = num_steps
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
    alphas = 1.0 - betas
    abar = jnp.cumprod(alphas)
    abar_prev = jnp.concatenate([jnp.ones(1), abar[:-1]])
    return {
        "betas": betas,
        "abar": abar,
        # posterior mean of x_{k-1} given x_k and x0_hat (Ho et al. 2020, eq. 7)
        "c1": jnp.sqrt(abar_prev) * betas / (1.0 - abar),
        "c2": jnp.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),
        # sigma_k^2 = b_k (ours): with K = 20 the posterior variance makes broad policies too narrow
        # (tests/test_core.py::test_sampler_fidelity; ALGORITHM.md sec. 3 "Measured")
        "sigma": jnp.sqrt(betas),
    }


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
    """Noise predictor eps_theta(x_k, k, o): MLP with mish (Table 3) on [x_k, sin-emb(k), o].

    __call__ defines the network (and its parameters). The sampler evaluates the same function in two parts:
    condition(o), the observation's share of the first layer, once per chain, then denoise(x_k, k, c) at every step.
    """

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
    """Reverse DDPM chain x_K ~ N(0, I) -> x_0 in one lax.scan, then a = clip(x_0, -1, 1) (Sec. 4.1).

    obs has shape (..., obs_dim); returns actions of shape (..., action_dim). Key use: split(key, K + 1),
    keys[0] draws x_K and keys[1 + K - k] the noise of step k = K..1 (tests replay this with a Python loop).
    """
    K = sched["betas"].shape[0]
    keys = jax.random.split(key, K + 1)
    x_K = jax.random.normal(keys[0], obs.shape[:-1] + (action_dim,))
    cond = apply_fn(params, obs, method="condition")  # the observation's share of the first layer, once per chain

    def step(x, inp):
        k, step_key = inp  # k runs K..1
        i = k - 1
        eps = apply_fn(params, x, k, cond, method="denoise")
        # x0 prediction clipped to the action box (as in DACER), then the DDPM posterior mean
        x0 = jnp.clip((x - jnp.sqrt(1.0 - sched["abar"][i]) * eps) / jnp.sqrt(sched["abar"][i]), -1.0, 1.0)
        noise = jnp.where(k > 1, sched["sigma"][i], 0.0) * jax.random.normal(step_key, x.shape)
        return sched["c1"][i] * x0 + sched["c2"][i] * x + noise, None

    x_0, _ = jax.lax.scan(step, x_K, (jnp.arange(K, 0, -1), keys[1:]))
    return jnp.clip(x_0, -1.0, 1.0)


def dsm_loss(apply_fn, params, obs, x0, key, sched, weights=None):
    """Denoising score matching (eq. 1) on x0 of shape (B, M, d) with obs (B, obs_dim).

    weights (B, M), if given, replace the plain mean over the M samples of each state (ISSM, eq. 2).
    """
    B, M, d = x0.shape
    K = sched["betas"].shape[0]
    k_key, eps_key = jax.random.split(key)
    k = jax.random.randint(k_key, (B, M), 1, K + 1)
    eps = jax.random.normal(eps_key, x0.shape)
    abar = sched["abar"][k - 1][..., None]
    x_k = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
    obs_m = jnp.broadcast_to(obs[:, None, :], (B, M, obs.shape[-1]))
    per_sample = jnp.sum((apply_fn(params, x_k, k, obs_m) - eps) ** 2, axis=-1)
    if weights is None:
        weights = jnp.full((B, M), 1.0 / M)
    return jnp.mean(jnp.sum(weights * per_sample, axis=-1))


def issm_weights(q, eta, q_scale=None):
    """Self-normalised importance weights softmax_j(eta * Qbar(s, a_j) / scale) over the M samples of a state.

    With q = pi^t as proposal the weight pi^{t+1} / pi^t is exp(eta Qbar) / Z(s) (Sec. 4.1). q_scale None divides
    each state's Qbar by its own std over the M samples (the sharpness is then fixed, whatever the Q differences);
    a number divides every state by the same scale (ours: --weight-rule, ALGORITHM.md sec. 4).
    """
    if q_scale is None:
        q = (q - q.mean(axis=-1, keepdims=True)) / (q.std(axis=-1, keepdims=True) + 1e-6)
    else:
        q = q / q_scale
    return jax.lax.stop_gradient(jax.nn.softmax(eta * q, axis=-1))


def weight_ess(weights):
    """Effective sample size of each state's weights as a fraction of M: 1 / (M sum_j w_j^2), in [1/M, 1]."""
    return 1.0 / (weights.shape[-1] * jnp.sum(weights**2, axis=-1))


def issm_temperature(temp, q, rule, eta, target_ess, mask=None, rate=0.01):
    """ISSM weights (B, M) at this update's temperature -> (weights, new temp, mean ESS fraction, eta_t). Ours.

    rule "state": each state's Qbar standardised over its M samples; "batch": Qbar over one scale for all states,
    a running mean (rate per update) of the batch's mean within-state std, so states whose samples barely differ
    get near-uniform weights; "raw": Qbar as it is. target_ess > 0 adapts eta_t = eta exp(log_eta) by dual ascent,
    as SAC tunes its alpha: log_eta rises while the weights' mean ESS fraction exceeds the target, falls below it.
    mask (B,) in {0, 1} leaves rows out of both averages (dead SMAX allies). temp: {"log_eta", "q_scale"}, zeros.
    """
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


# ALGO LOGIC: Algorithm 2 with a pluggable policy class. One iteration: every env steps once, then U updates.
def make_train(args: Args, env, policy: str):
    """Returns init(seed), train_chunk(state, chunk), evaluate(actor, seed, step), critic_value(critic, state, action)
    and probe(actor, seed), all per seed, then the env steps per chunk and the number of chunks.

    The ddpl_smax.py loop, written once for both envs: MPE is the special case with no deaths, no wins and the
    concatenated observations as global state.
    """
    N, D, S, A = env.num_agents, env.obs_dim, env.state_dim, env.act_dim
    E, B = args.num_envs, args.batch_size
    Bp = args.issm_batch_size or max(1, B // args.num_action_samples)  # states per policy step (the DDPL scripts' B_p)
    iters_per_chunk = args.eval_every // E
    num_iterations = (args.total_timesteps // (iters_per_chunk * E)) * iters_per_chunk
    num_updates = max(1, args.updates_per_iteration * (num_iterations - args.learning_starts // E))
    init_actor, sample, actor_loss = make_policy(args, policy, A)
    critic_net = TwinCritic(hidden=args.hidden_size)
    tx = optax.adam(optax.linear_schedule(args.learning_rate, args.learning_rate_end, num_updates))  # Table 3

    def act(actor, obs, key):
        """Decentralized execution: agent i samples a_i ~ pi_i(.|o_i). obs (..., N, D) -> actions (..., N, A)."""
        actions = jax.vmap(sample)(actor, jnp.moveaxis(obs, -2, 0), jax.random.split(key, N))
        return jnp.moveaxis(actions, 0, -2)

    def init(seed):
        key, k_actor, k_critic, k_env = jax.random.split(jax.random.PRNGKey(seed), 4)
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
        """One critic step and one policy step of one agent (vmapped over agents); dead agents as in ddpl_smax.py."""
        k_next, k_actor = jax.random.split(key)
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
        obs, alive = mine["obs"][:Bp], mine["alive"][:Bp]  # the policy step's B_p states, both classes
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
        action = jax.lax.cond(
            iteration * E < args.learning_starts,  # warm-up: uniform random actions
            lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0),
            lambda: act(rs["learner"]["actor"], rs["obs"], k_act),
        )
        out = jax.vmap(env.step)(jax.random.split(k_env, E), rs["env_state"], action)
        transitions = {"obs": rs["obs"], "world_state": rs["world_state"], "action": action}
        transitions |= {
            k: out[k] for k in ("reward", "terminal", "alive", "next_alive", "next_obs", "next_world_state")
        }
        ep_return, done = rs["ep_return"] + out["reward"].mean(axis=-1), out["done"]
        ep_stats = ep_stats + jnp.stack([jnp.sum(ep_return * done), jnp.sum(out["won"] & done), jnp.sum(done)])
        rs |= {"buffer": buffer_add(rs["buffer"], transitions, iteration), "env_state": out["state"]}
        rs |= {"obs": out["obs"], "world_state": out["world_state"], "ep_return": ep_return * (1 - done), "key": key}

        def updates(rs):
            rs, metrics = jax.lax.scan(
                lambda r, k: update(r, iteration, k), rs, jax.random.split(k_upd, args.updates_per_iteration)
            )
            return rs, metrics.mean(axis=0), jnp.float32(1.0)

        def no_updates(rs):
            return rs, jnp.zeros(len(UPDATE_METRICS)), jnp.float32(0.0)

        learn = ((iteration + 1) * E >= args.learning_starts) & (args.updates_per_iteration > 0)
        rs, metrics, updated = jax.lax.cond(learn, updates, no_updates, rs)
        return (rs, ep_stats), (metrics, updated)

    def train_chunk(rs, chunk):
        iterations = chunk * iters_per_chunk + jnp.arange(iters_per_chunk)
        (rs, (ret_sum, win_sum, count)), (metrics, updated) = jax.lax.scan(
            iteration_step, (rs, jnp.zeros(3)), iterations
        )
        metrics = jnp.where(updated.sum() > 0, (metrics * updated[:, None]).sum(axis=0) / updated.sum(), jnp.nan)
        train = {"train_return": ret_sum / count, "train_win_rate": win_sum / count}
        return rs, dict(zip(UPDATE_METRICS, metrics, strict=True)) | jax.tree.map(
            lambda x: jnp.where(count > 0, x, jnp.nan), train
        )

    def evaluate(actor, seed, global_step):
        """Mean return (per agent) and win rate of --num-eval-episodes episodes, stochastic policy (Sec. 5), and for
        the critic check the mean discounted return sum_t gamma^t reward_scale r_t with the first states and actions."""
        key, k_reset = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), global_step))
        obs, state0, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, args.num_eval_episodes))

        def step(carry, key):
            obs, env_state, running, ret, won, disc, discount = carry
            k_act, k_env = jax.random.split(key)
            keys = jax.random.split(k_env, args.num_eval_episodes)
            action = act(actor, obs, k_act)
            out = jax.vmap(env.step)(keys, env_state, action)
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
        """PROBE_SAMPLES actions of every agent at the probe state, (N, PROBE_SAMPLES, A). The probe state is the
        reset state drawn with split(PRNGKey(seed))[0]: the same at every probe of a run and for both classes."""
        k_reset, k_act = jax.random.split(jax.random.PRNGKey(seed))  # the same keys at every probe
        obs, _, _ = env.reset(k_reset)
        return jax.vmap(sample)(
            actor, jnp.broadcast_to(obs[:, None], (N, PROBE_SAMPLES, D)), jax.random.split(k_act, N)
        )

    return init, train_chunk, evaluate, critic_value, probe, iters_per_chunk * E, num_iterations // iters_per_chunk


# TRY NOT TO MODIFY: logging, the comparison figure, the probe figure and the summary
class Diverged(RuntimeError):
    """A policy class's training went non-finite (the divergence guard)."""


def divergence(metrics: dict, learner: dict) -> str | None:
    """The divergence guard: which losses, Q means or parameter groups are non-finite after a chunk (None: none).

    A chunk without updates (warm-up) logs NaN losses by design, so the parameters decide: a non-finite loss or Q
    reaches them at the next Adam step. Infinite losses or Q count at once."""
    names = [k for k in ("critic_loss", "actor_loss", "q_mean") if k in metrics]
    groups = [
        k for k, v in learner.items() if not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(v)))
    ]
    bad = [k for k in names if (np.isinf(metrics[k]) if not groups else ~np.isfinite(metrics[k])).any()]
    return ", ".join(bad + [f"{k} parameters" for k in groups]) + " non-finite" if bad or groups else None


def stats(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "per_seed": values.tolist()}


def plot_curves(rows: list[dict], labels: list[str], path: str, title: str, wins: str | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("episodic_return", "eval return per agent")] + ([("win_rate", wins)] if wins else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (name, ylabel) in zip(axes[0], panels, strict=True):
        for label, color in zip(labels, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            mine = [r for r in rows if r["policy"] == label]
            steps = sorted({r["global_step"] for r in mine})
            values = np.array([[float(r[name]) for r in mine if r["global_step"] == s] for s in steps])
            mean, std = values.mean(axis=1), values.std(axis=1)
            ax.plot(steps, mean, "o-" if len(steps) == 1 else "-", color=color, label=label)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        ax.set(xlabel="environment steps per seed", ylabel=f"{ylabel} (mean, std over seeds)")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_success(success: dict, path: str, args: Args):
    """--env toy: success rate (every agent at goal at the end of an evaluation episode) against N, per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ns = sorted(int(n) for n in next(iter(success.values())))
    ax.plot(ns, [TOY["p_goal"] ** n for n in ns], "k--", lw=1, label="optimal policy (p^N)")
    for label, color in zip(success, ("tab:blue", "tab:orange"), strict=False):
        mean = [success[label][str(n)]["mean"] for n in ns]
        std = [success[label][str(n)]["std"] for n in ns]
        ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, color=color, label=label)
    ax.set(
        xlabel="number of agents N", ylabel=f"success rate (mean, std of {args.num_seeds} seeds)", ylim=(-0.05, 1.05)
    )
    ax.set_xticks(ns)
    ax.set_title(f"Toy game, Algorithm 2, {args.total_timesteps:,} env steps per seed", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_probes(probes: dict, dims: tuple[int, int], path: str, title: str):
    """Fig. 4 right analogue: per class and probe step, agents 0 and 1's actions (dims `dims`) at the probe state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(probes)
    steps = probes[labels[0]]["steps"]
    fig, axes = plt.subplots(len(labels), len(steps), figsize=(2.6 * len(steps), 2.6 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for col, step in enumerate(steps):
            ax = axes[row][col]
            for agent, color in ((0, "tab:blue"), (1, "tab:red")):
                a = probes[label]["actions"][col, 0, min(agent, probes[label]["actions"].shape[2] - 1)]  # seed lane 0
                ax.scatter(a[:, dims[0]], a[:, dims[1]], s=2, alpha=0.3, color=color, label=f"agent {agent}")
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xticks=[], yticks=[])
            ax.set_title(f"{label}, {step:,} steps", fontsize=8)
    axes[0][0].legend(fontsize=7, markerscale=4)
    fig.suptitle(f"{title}: action dims {dims[0]} (x) and {dims[1]} (y) at the probe state, seed lane 0")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def seed_placement():
    """(lanes, whole): the seed axis split over all local devices (a 1-D mesh "seed"), and a replicated placement.

    Every jitted call takes and returns seed-major arrays placed by `lanes`, so each device trains its own block of
    seeds and the host only gathers metrics. On one device both are that device and nothing changes.
    """
    mesh = Mesh(np.array(jax.local_devices()), ("seed",))
    return NamedSharding(mesh, PartitionSpec("seed")), NamedSharding(mesh, PartitionSpec())


def train_one(args: Args, env, policy: str, label: str, seeds, log, bar_desc: str):
    """Train one policy class for all seeds; returns final/best eval arrays, sps and the probes."""
    from tqdm import tqdm

    start_compile = time.time()
    init, train_chunk, evaluate, critic_value, probe, steps_per_chunk, num_chunks = make_train(args, env, policy)
    lanes, whole = seed_placement()
    rs = jax.jit(jax.vmap(init), out_shardings=lanes)(seeds)
    train_chunk = jax.vmap(train_chunk, in_axes=(0, None))
    train_chunk = jax.jit(train_chunk, in_shardings=(lanes, whole), out_shardings=lanes, donate_argnums=0)
    train_chunk = train_chunk.lower(rs, jnp.int32(0)).compile()
    evaluate = jax.vmap(evaluate, in_axes=(0, 0, None))
    evaluate = jax.jit(evaluate, in_shardings=(lanes, lanes, whole), out_shardings=lanes)
    probe, critic_value = jax.jit(jax.vmap(probe)), jax.jit(jax.vmap(critic_value))
    print(f"{label}: compiled in {time.time() - start_compile:.0f} s; {num_chunks} chunks x {steps_per_chunk} steps")
    start, best, best_mean, probes, probe_steps = time.time(), None, -np.inf, [], []
    bar = tqdm(total=num_chunks * steps_per_chunk, unit="step", desc=bar_desc)
    if args.probe_every:  # before the first update, then every --probe-every env steps
        probes.append(np.asarray(probe(rs["learner"]["actor"], seeds)))
        probe_steps.append(0)
    for chunk in range(num_chunks):
        rs, metrics = train_chunk(rs, jnp.int32(chunk))
        global_step = (chunk + 1) * steps_per_chunk
        returns, wins, disc, state, action = evaluate(rs["learner"]["actor"], seeds, jnp.int32(global_step))
        q_first = critic_value(rs["learner"]["critic"], state, action)
        metrics = {"episodic_return": returns, "win_rate": wins, "q_first": q_first, "disc_return": disc, **metrics}
        metrics = jax.device_get(metrics)
        elapsed = time.time() - start
        sps = global_step / elapsed
        log(label, global_step, metrics, sps, elapsed)
        if reason := divergence(metrics, rs["learner"]):  # metrics.csv keeps this chunk; main writes no summary.json
            bar.close()
            raise Diverged(f"{label}: diverged at env step {global_step}: {reason}")
        final, final_win = metrics["episodic_return"], metrics["win_rate"]
        if final.mean() > best_mean:  # best = highest mean over seeds (Table 1's statistic)
            best, best_mean = final, final.mean()
        if args.probe_every and global_step % args.probe_every == 0:
            probes.append(np.asarray(probe(rs["learner"]["actor"], seeds)))
            probe_steps.append(global_step)
        bar.update(steps_per_chunk)
        bar.set_postfix(eval=f"{final.mean():.2f}")
    bar.close()
    result = {"final_eval_return": stats(final), "best_eval_return": stats(best), "sps": round(sps, 1)}
    if args.env in ("smax", "toy"):  # the toy's "win": every agent at goal at the episode's end
        result["final_win_rate"] = stats(final_win)
    probes = {"steps": probe_steps, "actions": np.stack(probes)} if probes else None
    return result, global_step, probes


def main(args: Args) -> int:
    if error := validate(args):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.num_seeds % jax.local_device_count():  # the seed axis is split evenly over the local devices
        n, backend = jax.local_device_count(), jax.default_backend()
        print(f"error: --num-seeds {args.num_seeds} is not a multiple of the {n} local {backend} devices the seeds are "
              f"split over; use a multiple of {n}", file=sys.stderr)  # fmt: skip
        return 2
    env_id = {"smax": f"SMAX_{args.map}", "toy": "toy"}.get(args.env, args.env_id)
    gaussian = f"gaussian-{args.projection}"
    labels = ["diffusion", gaussian] if args.compare else ["diffusion" if args.policy == "diffusion" else gaussian]
    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    script_start = time.time()

    seeds = jax.device_put(jnp.arange(args.num_seeds, dtype=jnp.int32) + args.seed, seed_placement()[0])
    print("seeds per device:", {str(s.device): np.asarray(s.data).tolist() for s in seeds.addressable_shards})
    metric_names = ("episodic_return", "win_rate", "train_return", "train_win_rate", "q_first", "disc_return")
    metric_names += UPDATE_METRICS
    if args.env == "mpe":  # MPE has no wins
        metric_names = tuple(m for m in metric_names if "win" not in m)
    agent_counts = args.toy_agents if args.env == "toy" else (None,)  # the toy trains every N in turn
    wandb_runs = {}
    if args.track:  # one W&B run per seed and class, grouped by run name: seeds are never averaged silently
        import wandb

        for label in labels:
            for s in seeds.tolist():
                config, name = {**asdict(args), "lane_seed": s, "policy_class": label}, f"{run_name}__{label}__seed{s}"
                wandb_runs[label, s] = wandb.init(
                    project=args.wandb_project_name, entity=args.wandb_entity, name=name, group=run_name,
                    config=config, reinit="create_new",
                )  # fmt: skip
    rows = []
    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    fields = ("global_step", "seed", "policy", *(("num_agents",) if args.env == "toy" else ()), *metric_names)
    fields += ("sps", "wall_time")
    current = {"num_agents": None}  # the toy's N being trained, for the num_agents column
    writer = csv.DictWriter(metrics_file, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()

    def log(label: str, global_step: int, metrics: dict, sps: float, wall_time: float):
        for i, s in enumerate(seeds.tolist()):
            row = {"global_step": global_step, "seed": s, "policy": label, **current}
            row |= {k: float(metrics[k][i]) for k in metric_names} | {
                "sps": round(sps, 1),
                "wall_time": round(wall_time, 2),
            }
            writer.writerow(row)
            rows.append(row)
            if wandb_runs:
                wandb_runs[label, s].log({k: v for k, v in row.items() if k in metric_names}, step=global_step)
        metrics_file.flush()

    results, probes = {}, {}  # results[(label, N)]; N is None except on the toy
    try:
        for n in agent_counts:
            env, current["num_agents"] = make_env(args, n), n
            for i, label in enumerate(labels):
                policy = "diffusion" if label == "diffusion" else "gaussian"
                desc = f"{label} ({i + 1}/{len(labels)}){f', N = {n}' if n else ''}, {args.num_seeds} seed(s)"
                results[label, n], total_timesteps, probe = train_one(args, env, policy, label, seeds, log, desc)
                if probe is not None:
                    probes[label if n is None else f"{label}, N = {n}"] = probe
    except KeyboardInterrupt:  # the run folder stays without summary.json: incomplete, and says so
        print(f"interrupted; {run_dir} is incomplete (no summary.json)", file=sys.stderr)
        return 130
    except Diverged as e:
        print(f"error: {e}; {run_dir} is incomplete", file=sys.stderr)
        return 1
    metrics_file.close()
    title = f"DDPL policy classes on {env_id}" + (f", N = {agent_counts[-1]}" if args.env == "toy" else "")
    curve_rows = [r for r in rows if r.get("num_agents") == agent_counts[-1]] if args.env == "toy" else rows
    wins = {"smax": "eval win rate", "toy": "eval success rate"}.get(args.env)
    plot_curves(curve_rows, labels, os.path.join(run_dir, "learning_curve.png"), title, wins)
    if probes:  # SMAX: P(move), angle; MPE: left and right force; toy: the one action dim
        dims = {"smax": (1, 3), "mpe": (1, 2), "toy": (0, 0)}[args.env]
        plot_probes(probes, dims, os.path.join(run_dir, "probe.png"), env_id)
        arrays = {
            f"{label}__{name}": np.asarray(p[name]) for label, p in probes.items() for name in ("steps", "actions")
        }
        np.savez(os.path.join(run_dir, "probes.npz"), **arrays)
    if args.env == "toy":
        success = {label: {str(n): results[label, n]["final_win_rate"] for n in agent_counts} for label in labels}
        plot_success(success, os.path.join(run_dir, "success_vs_agents.png"), args)
    subject = results[labels[-1], agent_counts[-1]]  # the Gaussian with --compare, else the one class trained
    summary = {
        "script": os.path.basename(__file__),
        "env_id": env_id,
        "policy": labels[-1],
        "total_timesteps": total_timesteps,
        "num_seeds": args.num_seeds,
        "num_devices": jax.local_device_count(),
        **{k: v for k, v in subject.items() if k != "sps"},
        "wall_time_s": round(time.time() - script_start, 2),
        "sps": subject["sps"],
    }
    if args.env == "toy":  # per class and N: success rate and return at the last evaluation, per seed
        summary |= {"toy_agents": list(agent_counts), "success_rate": success}
        summary["final_eval_return"] = {
            label: {str(n): results[label, n]["final_eval_return"] for n in agent_counts} for label in labels
        }
        summary.pop("final_win_rate"), summary.pop("best_eval_return")
    elif args.compare:  # one row per class, the same seeds and budget
        summary["comparison"] = {label: results[label, None] for label in labels}
    # summary.json last: its presence marks a complete run folder
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for run in wandb_runs.values():
        run.finish()
    for (label, n), result in results.items():
        final, name = result["final_eval_return"], label if n is None else f"{label}, N = {n}"
        rate = f", {'success' if n else 'win'} rate {result['final_win_rate']['mean']:.2f}" if n or wins else ""
        print(f"{name:>24}: final eval return {final['mean']:.3f} +- {final['std']:.3f}{rate}")
    print(f"wrote {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
