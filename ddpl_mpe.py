"""DDPL (Decentralized Diffusion Policy Learning, arXiv 2605.07101, Algorithm 2) on JaxMARL MPE Simple-Reference.

Each agent's DDPM policy acts on its own observation and moves toward pi^t exp(eta Qbar_i) by importance-sampling score
matching (ISSM, eq. 2), Qbar_i(s, a_i) a twin averaged-Q critic. Env steps, replay and updates run in one jitted
lax.scan per chunk, seeds and agents vmapped. Algorithm: docs/algorithm.md; this script: docs/ddpl_mpe.md."""

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
import flax.serialization
import jax
import jax.numpy as jnp
import jaxmarl
import numpy as np
import optax
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta")
METRICS = ("episodic_return", "train_return", "q_first", "disc_return", *UPDATE_METRICS)
# JaxMARL 0.2.0's MPE scenarios that take action_type="Continuous" (tests/test_mpe.py checks the list)
MPE_SCENARIOS = "reference_v3 v3 tag_v3 world_comm_v3 spread_v3 crypto_v3 speaker_listener_v4 push_v3 adversary_v3"
ENV_IDS = Literal[tuple(f"MPE_simple_{name}" for name in MPE_SCENARIOS.split())]


@dataclass
class Args:
    exp_name: str = "ddpl_mpe"  # the name of this experiment (part of the run folder's name)
    seed: int = 0  # seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)
    num_seeds: int = 1  # independent runs vmapped in one process, split over all local devices (a multiple of them)
    track: bool = False  # log to Weights & Biases as well (one run, every metric per seed)
    wandb_project_name: str = "ddpl"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team); None: your default
    save_model: bool = False  # write every seed's actor to runs/<run_name>/model.flax (benchmarks/evaluate.py plays it)
    runs_dir: str = "runs"  # parent folder of the run folder

    # Algorithm specific arguments
    env_id: ENV_IDS = "MPE_simple_reference_v3"  # a continuous-action JaxMARL MPE scenario (paper: Simple-Reference-v2)
    total_timesteps: int = 2_000_000  # environment steps per seed (each of the --num-envs envs counts)
    num_envs: int = 20  # parallel envs, each stepped once per iteration (Table 3 "rollout batch size")
    buffer_size: int = 1_000_000  # replay buffer capacity in transitions (ours); circular
    learning_starts: int = 10_000  # environment steps of uniform random actions before the first update (ours)
    updates_per_iteration: int = 1  # U: gradient updates after each vector step (ours; 0: only collect data)
    batch_size: int = 256  # transitions per update (Table 3)
    gamma: float = 0.99  # discount factor (ours)
    tau: float = 0.005  # Polyak rate of the target critics (Table 3 "smoothing parameter")
    learning_rate: float = 1e-4  # Adam learning rate of actors and critics at the start, decayed linearly (Table 3)
    learning_rate_end: float = 5e-5  # Adam learning rate at the last update (Table 3)
    hidden_size: int = 256  # width of the 3 mish layers of score networks and critics (Table 3)
    num_diffusion_steps: int = 20  # K: denoising steps of every policy (Table 3)
    noise_schedule: Literal["linear", "cosine", "vp"] = "cosine"  # beta schedule (ours: cosine; Table 3: linear)
    eta: float = 1.0  # DecSPG step eta of the target pi^t exp(eta Qbar) (Table 3 "diffusion policy update lr")
    num_action_samples: int = 4  # M: actions per state from pi^t for ISSM (ours); >= 2
    issm_batch_size: int = 0  # B_p: states whose M proposals train the ISSM step (ours); 0: batch_size // M
    weight_rule: Literal["state", "batch", "raw"] = "state"  # Qbar's ISSM softmax scale (ours): state std, running, raw
    target_ess: float = 0.0  # 0: fixed eta; in (0, 1): eta adapts to hold the weights' mean ESS / M at this target
    proposal_mix: float = 0.0  # m: share of ISSM proposals uniform on the box (ours); target ((1-m) pi^t + m U) e^eta Q
    reward_scale: float = 1.0  # multiplies rewards in the TD target (ours)
    team_reward: bool = True  # critics learn the mean reward over agents (paper Sec. 2.1); off: each agent's own reward
    eval_every: int = 20_000  # environment steps between evaluations (one jitted chunk of training each)
    num_eval_episodes: int = 50  # episodes per seed and evaluation, stochastic policy (paper Sec. 5)


# ALGO LOGIC: environment glue. JaxMARL's dicts become arrays with agents on a leading axis.
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


def buffer_init(size: int, N: int, D: int, A: int) -> dict:
    """Fixed-size replay arrays for N agents, D-dim observations and A-dim actions; they live in the scan carry."""
    shapes = {"obs": (N, D), "action": (N, A), "reward": (N,), "next_obs": (N, D), "done": ()}
    return {name: jnp.zeros((size, *shape)) for name, shape in shapes.items()}


def buffer_add(buffer: dict, transitions: dict, iteration) -> dict:
    """Circular insert of one vector step (E transitions) at rows iteration * E, ..., mod the buffer size."""
    size, num = buffer["done"].shape[0], transitions["done"].shape[0]
    rows = (iteration * num + jnp.arange(num)) % size
    return jax.tree.map(lambda b, x: b.at[rows].set(x), buffer, transitions)


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


# ALGO LOGIC: Algorithm 2. One iteration: every env steps once, then U updates of every agent's critic and policy.
def make_train(args: Args, env: MPEArrays):
    """Per-seed functions that main vmaps: init(seed), chunk(state, c) (one lax.scan), evaluate, critic_value."""
    N, D, A = env.num_agents, env.obs_dim, env.act_dim  # agents, (padded) observation and action dims
    E, B, M = args.num_envs, args.batch_size, args.num_action_samples
    Bp = args.issm_batch_size or max(1, B // M)  # ISSM states: sampler rows K (B + Bp M), not K B (1 + M)
    iters_per_chunk = args.eval_every // E
    num_iterations = (args.total_timesteps // (iters_per_chunk * E)) * iters_per_chunk
    num_updates = max(1, args.updates_per_iteration * (num_iterations - args.learning_starts // E))
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    score_net, critic_net = ScoreNet(action_dim=A, hidden=args.hidden_size), TwinCritic(hidden=args.hidden_size)
    # Table 3: Adam, learning rate linear 1e-4 -> 5e-5 over training, for actors and critics alike
    tx = optax.adam(optax.linear_schedule(args.learning_rate, args.learning_rate_end, num_updates))

    def act(actor, obs, key):
        """Decentralized execution: agent i samples a_i ~ pi_i(.|o_i). obs (..., N, D) -> actions (..., N, A)."""
        sample = jax.vmap(lambda p, o, k: sample_actions(score_net.apply, p, o, k, sched, A))
        return jnp.moveaxis(sample(actor, jnp.moveaxis(obs, -2, 0), jax.random.split(key, N)), 0, -2)

    def init(seed):
        key, k_actor, k_critic, k_env = jax.random.split(jax.random.PRNGKey(seed), 4)
        # agents are a stacked leading axis of every parameter pytree: separate parameters, vmapped
        actor = jax.vmap(score_net.init, (0, None, None, None))(
            jax.random.split(k_actor, N), jnp.zeros((1, A)), jnp.ones(1, jnp.int32), jnp.zeros((1, D))
        )
        critic = jax.vmap(critic_net.init, (0, None, None))(
            jax.random.split(k_critic, N), jnp.zeros((1, N * D)), jnp.zeros((1, A))
        )
        learner = {"actor": actor, "critic": critic, "critic_target": critic}
        learner |= {"actor_opt": jax.vmap(tx.init)(actor), "critic_opt": jax.vmap(tx.init)(critic)}
        learner["temp"] = {"log_eta": jnp.zeros(N), "q_scale": jnp.zeros(N)}  # issm_temperature's state per agent
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_env, E))
        rs = {"learner": learner, "buffer": buffer_init(args.buffer_size, N, D, A), "env_state": env_state}
        return rs | {"obs": obs, "ep_return": jnp.zeros(E), "key": key}

    def update_agent(p, mine, shared, key):
        """One critic and one ISSM step of one agent (vmapped): p its parameters, mine its o, a, r, o'; shared s, s'."""
        k_next, k_prop, k_dsm = jax.random.split(key, 3)
        # Averaged-Q critic (Alg. 2, line 5): global state and OWN action; a_i' ~ pi_i(.|o_i') from the sampler
        next_action = sample_actions(score_net.apply, p["actor"], mine["next_obs"], k_next, sched, A)
        q_next = jnp.minimum(*critic_net.apply(p["critic_target"], shared["next_state"], next_action))
        y = mine["reward"] * args.reward_scale + args.gamma * (1.0 - shared["done"]) * q_next

        def critic_loss(params):
            q1, q2 = critic_net.apply(params, shared["state"], mine["action"])
            return jnp.mean((q1 - y) ** 2) + jnp.mean((q2 - y) ** 2), q1.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(p["critic"])
        updates, critic_opt = tx.update(grads, p["critic_opt"])
        critic = optax.apply_updates(p["critic"], updates)
        # ISSM (eq. 2) on the first B_p states (rows are i.i.d.): M proposals per state from pi^t, no gradient
        # through the sampler, weights softmax_j(eta * Qbar) with Qbar = min of the twin online critics just updated
        obs, state = mine["obs"][:Bp], shared["state"][:Bp]
        obs_m = jnp.broadcast_to(obs[:, None], (Bp, M, D))
        proposals = sample_actions(score_net.apply, p["actor"], obs_m, k_prop, sched, A)
        proposals = mix_proposals(proposals, jax.random.fold_in(k_prop, 1), args.proposal_mix)
        q = jnp.minimum(*critic_net.apply(critic, jnp.broadcast_to(state[:, None], (Bp, M, N * D)), proposals))
        weights, temp, ess, eta = issm_temperature(p["temp"], q, args.weight_rule, args.eta, args.target_ess)
        a_loss, grads = jax.value_and_grad(dsm_loss, argnums=1)(
            score_net.apply, p["actor"], obs, proposals, k_dsm, sched, weights
        )
        updates, actor_opt = tx.update(grads, p["actor_opt"])
        actor = optax.apply_updates(p["actor"], updates)
        critic_target = optax.incremental_update(critic, p["critic_target"], args.tau)  # Polyak (Table 3)
        p = {"actor": actor, "actor_opt": actor_opt, "critic": critic, "critic_target": critic_target, "temp": temp}
        metrics = [c_loss, a_loss, q_mean, weights.max(axis=-1).mean(), ess, eta]
        return p | {"critic_opt": critic_opt}, jnp.stack(metrics)

    def update(rs, iteration, key):
        k_idx, k_agents = jax.random.split(key)
        filled = jnp.minimum((iteration + 1) * E, args.buffer_size)
        batch = jax.tree.map(lambda x: x[jax.random.randint(k_idx, (B,), 0, filled)], rs["buffer"])
        if args.team_reward:  # identical interest: every critic learns the team's (mean) reward
            batch["reward"] = jnp.broadcast_to(batch["reward"].mean(axis=-1, keepdims=True), (B, N))
        mine = {k: jnp.swapaxes(batch[k], 0, 1) for k in ("obs", "action", "reward", "next_obs")}  # agents first
        shared = {"state": batch["obs"].reshape(B, N * D), "next_state": batch["next_obs"].reshape(B, N * D)}
        learner, metrics = jax.vmap(update_agent, in_axes=(0, 0, None, 0))(
            rs["learner"], mine, shared | {"done": batch["done"]}, jax.random.split(k_agents, N)
        )
        return rs | {"learner": learner}, metrics.mean(axis=0)

    def iteration_step(carry, iteration):
        rs, ep_sum, ep_count = carry
        key, k_act, k_env, k_upd = jax.random.split(rs["key"], 4)
        # iteration is not vmapped over seeds, so both conds stay real branches (no work wasted under vmap)
        action = jax.lax.cond(
            iteration * E < args.learning_starts,  # warm-up: uniform random actions
            lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0),
            lambda: act(rs["learner"]["actor"], rs["obs"], k_act),
        )
        next_obs, obs, env_state, reward, done = jax.vmap(env.step)(jax.random.split(k_env, E), rs["env_state"], action)
        # MPE episodes end only at the time limit: truncation, so bootstrapping never stops (done = 0 in the buffer)
        transitions = {"obs": rs["obs"], "action": action, "reward": reward, "next_obs": next_obs, "done": jnp.zeros(E)}
        ep_return = rs["ep_return"] + reward.mean(axis=-1)  # return averaged over agents
        ep_sum, ep_count = ep_sum + jnp.sum(ep_return * done), ep_count + jnp.sum(done)
        rs |= {"buffer": buffer_add(rs["buffer"], transitions, iteration), "env_state": env_state, "obs": obs}
        rs |= {"ep_return": ep_return * (1 - done), "key": key}

        def updates(rs):
            keys = jax.random.split(k_upd, args.updates_per_iteration)
            rs, metrics = jax.lax.scan(lambda r, k: update(r, iteration, k), rs, keys)
            return rs, metrics.mean(axis=0), jnp.float32(1.0)

        learn = ((iteration + 1) * E >= args.learning_starts) & (args.updates_per_iteration > 0)
        no_updates = lambda rs: (rs, jnp.zeros(len(UPDATE_METRICS)), jnp.float32(0.0))  # noqa: E731
        rs, metrics, updated = jax.lax.cond(learn, updates, no_updates, rs)
        return (rs, ep_sum, ep_count), (metrics, updated)

    def chunk(rs, chunk):
        iterations = chunk * iters_per_chunk + jnp.arange(iters_per_chunk)
        carry = (rs, jnp.zeros(()), jnp.zeros(()))  # running sum and count of finished training episodes' returns
        (rs, ep_sum, ep_count), (metrics, updated) = jax.lax.scan(iteration_step, carry, iterations)
        metrics = jnp.where(updated.sum() > 0, (metrics * updated[:, None]).sum(axis=0) / updated.sum(), jnp.nan)
        metrics = dict(zip(UPDATE_METRICS, metrics, strict=True))
        return rs, metrics | {"train_return": jnp.where(ep_count > 0, ep_sum / ep_count, jnp.nan)}

    def evaluate(actor, seed, global_step):
        """Mean return (Sec. 5), discounted return, first states and actions (critic check); key from seed and step."""
        key, k_reset = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), global_step))
        obs, env_state = jax.vmap(env.reset)(jax.random.split(k_reset, args.num_eval_episodes))

        def step(carry, key):
            obs, env_state, alive, ret, disc, discount = carry
            k_act, k_env = jax.random.split(key)
            action = act(actor, obs, k_act)
            keys = jax.random.split(k_env, args.num_eval_episodes)
            _, obs, env_state, reward, done = jax.vmap(env.step)(keys, env_state, action)
            r = alive * reward.mean(axis=-1)
            disc += discount * args.reward_scale * r
            return (obs, env_state, alive * (1.0 - done), ret + r, disc, discount * args.gamma), action

        carry = (obs, env_state, *jnp.zeros((3, args.num_eval_episodes)).at[0].set(1.0), jnp.float32(1.0))
        (*_, ret, disc, _), actions = jax.lax.scan(step, carry, jax.random.split(key, env.episode_length))
        return ret.mean(), disc.mean(), obs.reshape(-1, N * D), actions[0]

    def critic_value(critic, state, action):
        """The critic check: min(Q1, Q2)(s_0, a_i0) of the evaluation episodes' first step, mean over agents."""
        q = jax.vmap(lambda c, a: jnp.minimum(*critic_net.apply(c, state, a)))(critic, jnp.swapaxes(action, 0, 1))
        return q.mean()

    steps_per_chunk, num_chunks = iters_per_chunk * E, num_iterations // iters_per_chunk
    return SimpleNamespace(init=init, chunk=chunk, evaluate=evaluate, critic_value=critic_value,
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


def validate(args: Args) -> str | None:
    """The first invalid flag that tyro cannot check, as a one-line message (None: all valid)."""
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
    positive = min(args.tau, args.learning_rate, args.learning_rate_end) > 0 and args.eta >= 0
    if not (0 <= args.gamma <= 1 and args.tau <= 1 and positive):
        return "need 0 <= --gamma <= 1, 0 < --tau <= 1, --eta >= 0, --learning-rate and --learning-rate-end > 0"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track needs the wandb package (pip install wandb), which is not installed"
    if args.num_seeds % (n := jax.local_device_count()):  # the seed axis is split evenly over the local devices
        return f"--num-seeds {args.num_seeds} is not a multiple of the {n} local {jax.default_backend()} devices"
    return None


def main(args: Args) -> int:
    if error := validate(args):  # nothing is written before the flags are known to be valid
        print(f"error: {error}", file=sys.stderr)
        return 2
    # TRY NOT TO MODIFY: build and compile; each chunk: train, evaluate, log, progress; then save and summarise
    train, seeds = make_train(args, MPEArrays(args.env_id)), list(range(args.seed, args.seed + args.num_seeds))
    lanes = NamedSharding(Mesh(np.array(jax.local_devices()), ("seed",)), PartitionSpec("seed"))  # seeds over devices
    seed_ids = jax.device_put(jnp.array(seeds, jnp.int32), lanes)
    run = RunFolder(args, args.env_id, METRICS)
    rs = jax.jit(jax.vmap(train.init), out_shardings=lanes)(seed_ids)
    train_chunk = jax.jit(jax.vmap(train.chunk, (0, None)), out_shardings=lanes, donate_argnums=0)
    train_chunk = train_chunk.lower(rs, jnp.int32(0)).compile()
    evaluate, critic_value = jax.jit(jax.vmap(train.evaluate, (0, 0, None))), jax.jit(jax.vmap(train.critic_value))
    devices = {d for leaf in jax.tree.leaves(rs) for d in leaf.devices()}  # where the runner state lives
    per_device = {str(s.device): np.asarray(s.data).tolist() for s in seed_ids.addressable_shards}
    print(f"seeds per device: {per_device}; runner state on {len(devices)} device(s); {train.num_chunks} chunks")
    start, returns = time.time(), []
    with tqdm(total=train.num_chunks * train.steps_per_chunk, unit="step", desc=f"{args.num_seeds} seed(s)") as bar:
        for chunk in range(train.num_chunks):
            rs, metrics = train_chunk(rs, jnp.int32(chunk))  # --eval-every env steps per seed in one lax.scan
            global_step = (chunk + 1) * train.steps_per_chunk
            ret, disc, state, action = evaluate(rs["learner"]["actor"], seed_ids, jnp.int32(global_step))
            q_first = critic_value(rs["learner"]["critic"], state, action)  # the critic check against disc_return
            metrics |= {"episodic_return": ret, "disc_return": disc, "q_first": q_first}
            ok = run.log(global_step, seeds, metrics, rs["learner"], global_step / (time.time() - start))
            returns.append(np.asarray(ret))
            bar.update(train.steps_per_chunk)
            bar.set_postfix(eval=f"{returns[-1][ok].mean():.2f}")
            if not ok.any():
                break  # every seed diverged
    if args.save_model:  # every seed's actor and the flags that rebuild it (benchmarks/evaluate.py)
        model = {"actor": rs["learner"]["actor"], "global_step": global_step, "config": json.dumps(asdict(args))}
        with open(os.path.join(run.dir, "model.flax"), "wb") as f:
            f.write(flax.serialization.to_bytes(model | {"script": os.path.basename(__file__)}))
    best = max(returns, key=lambda r: r[ok].mean())  # Table 1: the best mean eval return during training
    summary = {"env_id": args.env_id, "total_timesteps": global_step, "num_seeds": args.num_seeds}
    summary |= {"num_devices": len(devices), "final_eval_return": stats(returns[-1][ok])}
    summary |= {"best_eval_return": stats(best[ok]), "sps": round(global_step / (time.time() - start), 1)}
    panels = {"return per agent": {"eval": ("episodic_return", {}), "training episodes": ("train_return", {})}}
    return run.finish(summary if ok.any() else None, panels, f"DDPL on {args.env_id}")


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
