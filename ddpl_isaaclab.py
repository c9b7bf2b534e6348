"""DDPL (Decentralized Diffusion Policy Learning, arXiv 2605.07101, Algorithm 2) on IsaacLab's bimanual Shadow Hand.

Each hand of Isaac-Shadow-Hand-Over-Direct-v0 moves its DDPM policy toward pi^t exp(eta Qbar_i) by ISSM (eq. 2); Isaac
Sim (RTX GPU) steps the envs in torch, JAX acts and learns on tensors shared by DLPack. Details: docs/ddpl_isaaclab.md.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: Isaac Sim and torch share the GPU

import contextlib
import csv
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tqdm import tqdm

UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta")
METRICS = ("episodic_return", "episode_length", "train_return", *UPDATE_METRICS, "env_share")
INSTALL_HINT = "this needs Isaac Sim on an RTX-class NVIDIA GPU, installed as docs/ddpl_isaaclab.md says"


@dataclass
class Args:
    exp_name: str = "ddpl_isaaclab"  # the name of this experiment (part of the run folder's name)
    seed: int = 0  # seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)
    num_seeds: int = 1  # independent runs in one process: vmapped parameters; Isaac Sim hosts num_seeds x num_envs envs
    track: bool = False  # log to Weights & Biases as well (one run, every metric per seed)
    wandb_project_name: str = "ddpl"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team); None: your default
    save_model: bool = False  # write every seed's actor to runs/<run_name>/model.flax (benchmarks/evaluate.py plays it)
    runs_dir: str = "runs"  # parent folder of the run folder
    device: str = "cuda:0"  # the GPU that Isaac Sim, torch and JAX share (AppLauncher's and the env config's device)

    # Algorithm specific arguments
    task: str = "Isaac-Shadow-Hand-Over-Direct-v0"  # an IsaacLab DirectMARLEnv task id (written for Shadow Hand over)
    total_timesteps: int = 20_000_000  # environment steps per seed (each of the --num-envs envs counts; ours)
    num_envs: int = 256  # parallel envs per seed (ours: IsaacLab's default 2048 gives 8x fewer updates per env step)
    buffer_size: int = 500_000  # replay buffer capacity in transitions per seed (ours); circular
    learning_starts: int = 25_600  # environment steps per seed of uniform random actions before the first update (ours)
    updates_per_iteration: int = 4  # U: gradient updates after each vector step (ours; 0: only collect data)
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
    reward_scale: float = 1.0  # multiplies the team reward in the TD target (ours)
    eval_every: int = 512_000  # environment steps per seed between evaluations (one episode in every env)


# ALGO LOGIC: environment glue. Dicts of torch tensors keyed by agent <-> stacked JAX arrays, on the env's device.
@contextlib.contextmanager
def isaac_sim(args: Args):
    """Isaac Sim headless, then --task with num_seeds x num_envs envs (gym.make); ValueError without IsaacLab."""
    if missing := [m for m in ("torch", "isaacsim", "isaaclab", "isaaclab_tasks") if not importlib.util.find_spec(m)]:
        raise ValueError(f"IsaacLab is not installed here (missing: {', '.join(missing)}): {INSTALL_HINT}")
    from isaaclab.app import AppLauncher  # Isaac Sim must be running before any other isaaclab module is imported

    app = AppLauncher(headless=True, device=args.device).app
    try:
        import gymnasium as gym
        import isaaclab_tasks  # noqa: F401  (registers the Isaac-* task ids with gymnasium)
        from isaaclab_tasks.utils import parse_env_cfg

        cfg = parse_env_cfg(args.task, device=args.device, num_envs=args.num_seeds * args.num_envs)
        cfg.seed = args.seed
        with contextlib.closing(gym.make(args.task, cfg=cfg)) as env:  # env.close() on the way out
            yield env
    finally:
        app.close()


def to_jax(tensor) -> jax.Array:
    """A torch tensor as a JAX array through DLPack, no copy on the same device (bools become float32 first)."""
    tensor = tensor if tensor.dtype.is_floating_point else tensor.float()
    return jax.dlpack.from_dlpack(tensor.contiguous())


class IsaacAdapter:
    """A DirectMARLEnv of num_seeds x E envs as per-seed stacked arrays: observations (seed, E, N, D) zero-padded,
    state (seed, E, S), actions (seed, E, N, A) in [-1, 1]. IsaacLab resets finished envs inside step()."""

    def __init__(self, env, num_seeds: int, num_envs: int | None = None):
        self.torch, self.env = importlib.import_module("torch"), env
        self.base = base = getattr(env, "unwrapped", env)  # gym.make wraps the DirectMARLEnv
        if str(base.device).startswith("cuda") and jax.default_backend() != "gpu":  # DLPack shares one device only
            hint = "install JAX's CUDA build (pip install 'jax[cuda12]==0.5.3', docs/ddpl_isaaclab.md)"
            raise ValueError(f"the env's tensors are on {base.device} but JAX runs on {jax.default_backend()}: {hint}")
        if base.num_envs % num_seeds or num_envs not in (None, base.num_envs // num_seeds):
            raise ValueError(f"the env holds {base.num_envs} envs, not {num_seeds} seed(s) x {num_envs or 'E'} envs")
        self.agents = list(getattr(base, "possible_agents", None) or base.observation_spaces)
        self.obs_dims = [int(base.observation_spaces[a].shape[0]) for a in self.agents]
        self.act_dims = [int(base.action_spaces[a].shape[0]) for a in self.agents]
        self.num_agents, self.obs_dim, self.act_dim = len(self.agents), max(self.obs_dims), max(self.act_dims)
        self.num_seeds, self.num_envs = num_seeds, base.num_envs // num_seeds
        self.max_episode_length, self.state_dim = int(base.max_episode_length), None  # state_dim: after a reset

    def _lanes(self, x: jax.Array) -> jax.Array:  # (num_seeds * E, ...) -> (num_seeds, E, ...)
        return x.reshape(self.num_seeds, self.num_envs, *x.shape[1:])

    def _obs(self, obs: dict) -> jax.Array:
        dims = zip(self.agents, self.obs_dims, strict=True)
        return self._lanes(jnp.stack([jnp.pad(to_jax(obs[a]), ((0, 0), (0, self.obs_dim - d))) for a, d in dims], 1))

    def _agents(self, x: dict) -> jax.Array:  # {agent: (seed * E,) tensor} -> (N, seed * E)
        return jnp.stack([to_jax(x[a]).reshape(-1) for a in self.agents])

    def _state(self) -> jax.Array:  # (seed, E, S)
        return self._lanes(to_jax(self.base.state()))

    def reset(self) -> dict:
        obs, _ = self.env.reset()
        out = {"obs": self._obs(obs), "state": self._state()}
        self.state_dim = out["state"].shape[-1]
        return out

    def step(self, action: jax.Array) -> dict:
        """All envs one step: "obs"/"state" are what the policies see next (post-reset where an episode ended)."""
        agents_first = jnp.moveaxis(action.reshape(-1, self.num_agents, self.act_dim), 1, 0)  # (N, seed*E, A)
        actions = self.torch.from_dlpack(agents_first)  # one tensor for all agents, no copy
        actions = {a: actions[i, :, :d] for i, (a, d) in enumerate(zip(self.agents, self.act_dims, strict=True))}
        obs, rewards, terminated, time_outs, _ = self.env.step(actions)
        reward = self._agents(rewards).mean(axis=0)  # the team reward: the hands' mean (the over task gives both one)
        terminal, time_out = self._agents(terminated).max(axis=0), self._agents(time_outs).max(axis=0)  # any agent's
        truncated = time_out * (1.0 - terminal)  # a time-out without termination (the ball fell: terminal)
        out = {"reward": reward, "terminal": terminal, "truncated": truncated, "done": jnp.maximum(terminal, truncated)}
        return {"obs": self._obs(obs), "state": self._state()} | {k: self._lanes(v) for k, v in out.items()}


def buffer_init(size: int, N: int, D: int, S: int, A: int) -> dict:
    """Fixed-size replay arrays: per-agent observations (N, D), the state S for the critics, actions (N, A)."""
    shapes = {"obs": (N, D), "state": (S,), "action": (N, A), "reward": (), "terminal": (), "truncated": ()}
    shapes |= {"next_obs": (N, D), "next_state": (S,)}
    return {name: jnp.zeros((size, *shape)) for name, shape in shapes.items()}


def buffer_add(buffer: dict, transitions: dict, iteration) -> dict:
    """Circular insert of one vector step (E transitions) at rows iteration * E, ..., mod the buffer size."""
    size, num = buffer["reward"].shape[0], transitions["reward"].shape[0]
    rows = (iteration * num + jnp.arange(num)) % size
    return jax.tree.map(lambda b, x: b.at[rows].set(x.astype(b.dtype)), buffer, transitions)


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


# ALGO LOGIC: Algorithm 2. One iteration: every env steps once (Isaac Sim), then U updates of every agent (jitted).
def make_train(args: Args, env: IsaacAdapter):
    """Per-seed init, act, learn and eval_policy (main jits and vmaps them over seeds), and the chunking."""
    N, S, D, A = env.num_agents, env.state_dim, env.obs_dim, env.act_dim  # agents, state, (padded) obs and actions
    E, B, M = env.num_envs, args.batch_size, args.num_action_samples
    Bp = args.issm_batch_size or max(1, B // M)  # ISSM states: sampler rows K (B + Bp M), not K B (1 + M)
    iters_per_chunk = args.eval_every // E
    num_chunks = args.total_timesteps // (iters_per_chunk * E)
    num_updates = max(1, args.updates_per_iteration * (num_chunks * iters_per_chunk - args.learning_starts // E))
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    score_net, critic_net = ScoreNet(action_dim=A, hidden=args.hidden_size), TwinCritic(hidden=args.hidden_size)
    # Table 3: Adam, learning rate linear 1e-4 -> 5e-5 over training, for actors and critics alike
    tx = optax.adam(optax.linear_schedule(args.learning_rate, args.learning_rate_end, num_updates))

    def policy(actor, obs, key):
        """Decentralized execution: agent i samples a_i ~ pi_i(.|o_i). obs (..., N, D) -> actions (..., N, A)."""
        sample = jax.vmap(lambda p, o, k: sample_actions(score_net.apply, p, o, k, sched, A))
        return jnp.moveaxis(sample(actor, jnp.moveaxis(obs, -2, 0), jax.random.split(key, N)), 0, -2)

    def init(seed):
        key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        # agents are a stacked leading axis of every parameter pytree: separate parameters, vmapped
        actor = jax.vmap(score_net.init, (0, None, None, None))(
            jax.random.split(k_actor, N), jnp.zeros((1, A)), jnp.ones(1, jnp.int32), jnp.zeros((1, D))
        )
        critic = jax.vmap(critic_net.init, (0, None, None))(
            jax.random.split(k_critic, N), jnp.zeros((1, S)), jnp.zeros((1, A))
        )
        learner = {"actor": actor, "critic": critic, "critic_target": critic}
        learner |= {"actor_opt": jax.vmap(tx.init)(actor), "critic_opt": jax.vmap(tx.init)(critic)}
        learner["temp"] = {"log_eta": jnp.zeros(N), "q_scale": jnp.zeros(N)}  # issm_temperature's state per agent
        return {"learner": learner, "buffer": buffer_init(args.buffer_size, N, D, S, A), "key": key}

    def act(actor, key, obs, iteration):
        """Actions of the E envs, (E, N, A); iteration is not vmapped over seeds, so the cond stays a real branch."""
        key, k_act = jax.random.split(key)
        warm_up = lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0)  # noqa: E731
        return key, jax.lax.cond(iteration * E < args.learning_starts, warm_up, lambda: policy(actor, obs, k_act))

    def update_agent(p, mine, shared, key):
        """Critic and ISSM step of one agent (vmapped); mine: o_i, a_i, o_i'; shared: s, s', r, terminal, truncated."""
        k_next, k_prop, k_dsm = jax.random.split(key, 3)
        # Averaged-Q critic (Alg. 2, line 5): state and OWN action; a_i' ~ pi_i(.|o_i') from the sampler
        next_action = sample_actions(score_net.apply, p["actor"], mine["next_obs"], k_next, sched, A)
        q_next = jnp.minimum(*critic_net.apply(p["critic_target"], shared["next_state"], next_action))
        y = shared["reward"] * args.reward_scale + args.gamma * (1.0 - shared["terminal"]) * q_next
        mask = 1.0 - shared["truncated"]  # a timed-out row's s' is the next episode's: no TD error (docs, "s'")

        def critic_loss(params):
            q1, q2 = critic_net.apply(params, shared["state"], mine["action"])
            td = mask * ((q1 - y) ** 2 + (q2 - y) ** 2)
            return td.sum() / jnp.maximum(mask.sum(), 1.0), q1.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(p["critic"])
        updates, critic_opt = tx.update(grads, p["critic_opt"])
        critic = optax.apply_updates(p["critic"], updates)
        # ISSM (eq. 2) on the first B_p states (rows are i.i.d.; truncated rows' s is true): M proposals per state from
        # pi^t, no gradient through the sampler, weights softmax_j(eta * Qbar), Qbar = min of the just-updated critics
        obs, state = mine["obs"][:Bp], shared["state"][:Bp]
        proposals = sample_actions(
            score_net.apply, p["actor"], jnp.broadcast_to(obs[:, None], (Bp, M, D)), k_prop, sched, A
        )
        proposals = mix_proposals(proposals, jax.random.fold_in(k_prop, 1), args.proposal_mix)
        q = jnp.minimum(*critic_net.apply(critic, jnp.broadcast_to(state[:, None], (Bp, M, S)), proposals))
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
        mine = {k: jnp.swapaxes(batch[k], 0, 1) for k in ("obs", "action", "next_obs")}  # agents first
        shared = {k: batch[k] for k in ("state", "next_state", "reward", "terminal", "truncated")}
        learner, metrics = jax.vmap(update_agent, in_axes=(0, 0, None, 0))(
            rs["learner"], mine, shared, jax.random.split(k_agents, N)
        )
        return rs | {"learner": learner}, metrics.mean(axis=0)

    def learn(rs, transitions, iteration):
        """Insert one vector step into the replay buffer, then U updates once the warm-up is over."""
        key, k_upd = jax.random.split(rs["key"])
        rs = rs | {"buffer": buffer_add(rs["buffer"], transitions, iteration), "key": key}

        def updates(rs):
            keys = jax.random.split(k_upd, args.updates_per_iteration)
            rs, metrics = jax.lax.scan(lambda r, k: update(r, iteration, k), rs, keys)
            return rs, metrics.mean(axis=0), jnp.float32(1.0)

        do_learn = ((iteration + 1) * E >= args.learning_starts) & (args.updates_per_iteration > 0)
        no_updates = lambda rs: (rs, jnp.zeros(len(UPDATE_METRICS)), jnp.float32(0.0))  # noqa: E731
        return jax.lax.cond(do_learn, updates, no_updates, rs)

    eval_policy = lambda actor, obs, key, t: policy(actor, obs, jax.random.fold_in(key, t))  # noqa: E731
    chunking = {"iters_per_chunk": iters_per_chunk, "steps_per_chunk": iters_per_chunk * E, "num_chunks": num_chunks}
    return SimpleNamespace(init=init, act=act, learn=learn, eval_policy=eval_policy, **chunking)


@jax.jit
def track_episodes(ep, reward, done):
    """Running returns (seed, E); the returns of episodes that end are added to ep["sum"] and counted in ep["count"]."""
    ret = ep["ret"] + reward
    return {"ret": ret * (1.0 - done), "sum": ep["sum"] + (ret * done).sum(-1), "count": ep["count"] + done.sum(-1)}


def chunk_metrics(updates: list, ep: dict) -> dict:
    """Per seed: learn's metrics averaged over the chunk's iterations that updated, the training episodes' return."""
    metrics, updated = (np.stack(x, axis=1) for x in zip(*jax.device_get(updates), strict=True))
    count, ep = updated.sum(axis=1, keepdims=True), jax.device_get(ep)  # count (seed, 1): iterations with updates
    mean = np.where(count > 0, (metrics * updated[..., None]).sum(axis=1) / np.maximum(count, 1), np.nan)
    train_return = np.where(ep["count"] > 0, ep["sum"] / np.maximum(ep["count"], 1), np.nan)
    return dict(zip(UPDATE_METRICS, mean.T, strict=True)) | {"train_return": train_return}


def evaluate(env: IsaacAdapter, eval_act, actor, seeds: list[int], global_step: int):
    """Mean return and length of the first episode of every (training) env from a reset, stochastic policy (Sec. 5)."""
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), global_step) for s in seeds])
    obs = env.reset()["obs"]
    running = jnp.ones((len(seeds), env.num_envs))
    ret, length = jnp.zeros_like(running), jnp.zeros_like(running)
    for t in range(env.max_episode_length):
        out = env.step(eval_act(actor, obs, keys, np.int32(t)))
        ret, length = ret + running * out["reward"], length + running
        running, obs = running * (1.0 - out["done"]), out["obs"]
        if t % 32 == 31 and not bool(running.any()):  # an occasional sync only
            break
    return {"episodic_return": np.asarray(ret.mean(axis=1)), "episode_length": np.asarray(length.mean(axis=1))}


def play(args: Args, actor, global_step: int) -> dict:
    """main's evaluation of a saved actor on --task in Isaac Sim (benchmarks/evaluate.py); ValueError without it."""
    with isaac_sim(args) as isaac_env:
        env = IsaacAdapter(isaac_env, args.num_seeds, args.num_envs)
        env.reset()  # the state's size is known after the first reset
        eval_act = jax.jit(jax.vmap(make_train(args, env).eval_policy, (0, 0, 0, None)))
        seeds = list(range(args.seed, args.seed + args.num_seeds))
        return evaluate(env, eval_act, actor, seeds, global_step)


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
    """The first invalid flag that tyro cannot check, as one line, or None. Runs before anything is written."""
    if not 0 <= args.issm_batch_size <= args.batch_size:
        return f"--issm-batch-size must be 0 (--batch-size // M) or 1..--batch-size, got {args.issm_batch_size}"
    if not (0 <= args.target_ess < 1 and 0 <= args.proposal_mix < 1):  # target_ess 0: fixed eta; mix 0: all from pi^t
        return f"need 0 <= --target-ess < 1 and 0 <= --proposal-mix < 1, got {args.target_ess}, {args.proposal_mix}"
    if args.num_action_samples < 2:
        return f"--num-action-samples must be >= 2 (per-state normalised ISSM weights), got {args.num_action_samples}"
    minimum = dict.fromkeys(("num_seeds", "num_envs", "batch_size", "hidden_size", "num_diffusion_steps"), 1)
    minimum |= {"updates_per_iteration": 0, "learning_starts": 0, "buffer_size": args.num_envs}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
    if not args.num_envs <= args.eval_every <= args.total_timesteps:
        got = f"{args.num_envs}, {args.eval_every}, {args.total_timesteps}"
        return f"need --num-envs <= --eval-every <= --total-timesteps, got {got}"
    if not (0 <= args.gamma <= 1 and 0 < args.tau <= 1 and args.eta >= 0 and args.learning_rate > 0):
        return "need 0 <= --gamma <= 1, 0 < --tau <= 1, --eta >= 0 and --learning-rate > 0"
    if args.learning_rate_end <= 0 or args.reward_scale <= 0:
        return "--learning-rate-end and --reward-scale must be > 0"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track needs the wandb package (pip install wandb), which is not installed"
    return None


def main(args: Args, env=None) -> int:
    """Trains on `env`, DirectMARLEnv-like with --num-seeds x --num-envs envs; None: Isaac Sim builds --task."""
    with contextlib.ExitStack() as isaac:  # closes the env and Isaac Sim on the way out
        try:  # nothing is written before the flags and the env are known to be usable
            if error := validate(args):
                raise ValueError(error)
            env = isaac.enter_context(isaac_sim(args)) if env is None else env
            env = IsaacAdapter(env, args.num_seeds, args.num_envs)  # ValueError: devices or env count
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # TRY NOT TO MODIFY: build and compile; each chunk: the env loop, evaluate, log, progress; then save, summarise
        env_id, seeds = f"IsaacLab_{args.task}", list(range(args.seed, args.seed + args.num_seeds))
        run, start = RunFolder(args, env_id, METRICS), env.reset()  # the state's size is known after the first reset
        train, dims = make_train(args, env), f"obs {env.obs_dims}, state {env.state_dim}, actions {env.act_dims}"
        # committed to the env's device, as DLPack's arrays are: learn then compiles once (a mix of both compiles twice)
        rs = jax.device_put(jax.jit(jax.vmap(train.init))(jnp.asarray(seeds, jnp.int32)), start["obs"].sharding)
        where = f"{env.num_envs} envs x {args.num_seeds} seeds on {env.base.device}, JAX on {jax.default_backend()}"
        gb = sum(x.nbytes for x in jax.tree.leaves(rs["buffer"])) / 1e9
        print(f"{env_id}: {env.agents}, {dims}; {where}; replay buffers {gb:.2f} GB", flush=True)
        act = jax.jit(jax.vmap(train.act, in_axes=(0, 0, 0, None)))
        learn = jax.jit(jax.vmap(train.learn, in_axes=(0, 0, None)), donate_argnums=0)
        eval_act = jax.jit(jax.vmap(train.eval_policy, (0, 0, 0, None)))  # play() compiles it the same way
        times, returns, t0 = np.zeros(3), [], time.time()  # seconds: training (env steps included), env.step, eval
        bar = tqdm(total=train.num_chunks * train.steps_per_chunk, unit="step", desc=f"{args.num_seeds} seed(s)")
        for chunk in range(train.num_chunks):
            chunk_start, env_time, obs, state, updates = time.time(), 0.0, start["obs"], start["state"], []
            zeros = jnp.zeros((args.num_seeds, env.num_envs))
            ep = {"ret": zeros, "sum": zeros[:, 0], "count": zeros[:, 0]}  # training episodes' returns
            for iteration in range(chunk * train.iters_per_chunk, (chunk + 1) * train.iters_per_chunk):
                key, action = act(rs["learner"]["actor"], rs["key"], obs, np.int32(iteration))
                env_start = time.time()
                out = env.step(action)  # Isaac Sim runs asynchronously on the GPU: env_time is a lower bound
                env_time += time.time() - env_start
                transitions = {"obs": obs, "state": state, "action": action, "next_obs": out["obs"]}
                transitions |= {k: out[k] for k in ("reward", "terminal", "truncated")} | {"next_state": out["state"]}
                ep, obs, state = track_episodes(ep, out["reward"], out["done"]), out["obs"], out["state"]
                rs, metrics, updated = learn(rs | {"key": key}, transitions, np.int32(iteration))
                updates.append((metrics, updated))
                bar.update(env.num_envs)
            jax.block_until_ready(rs["learner"])  # the last update, dispatched asynchronously, counts as training
            train_time, global_step = time.time() - chunk_start, (chunk + 1) * train.steps_per_chunk
            metrics = chunk_metrics(updates, ep) | evaluate(env, eval_act, rs["learner"]["actor"], seeds, global_step)
            start = env.reset()  # training resumes from fresh episodes after the evaluation
            times += (train_time, env_time, time.time() - chunk_start - train_time)
            metrics["env_share"] = np.full(args.num_seeds, env_time / train_time)
            ok = run.log(global_step, seeds, metrics, rs["learner"], global_step / (time.time() - t0))
            returns.append(metrics["episodic_return"])
            bar.set_postfix(eval=f"{returns[-1][ok].mean():.2f}")
            if not ok.any():
                break  # every seed diverged
        bar.close()
        if args.save_model:  # every seed's actor and the flags that rebuild it (benchmarks/evaluate.py)
            model = {"actor": rs["learner"]["actor"], "global_step": global_step, "config": json.dumps(asdict(args))}
            with open(os.path.join(run.dir, "model.flax"), "wb") as f:
                f.write(flax.serialization.to_bytes(model | {"script": os.path.basename(__file__)}))
        best = max(returns, key=lambda r: r[ok].mean())  # Table 1: the best mean eval return during training
        summary = {"env_id": env_id, "total_timesteps": global_step, "num_seeds": args.num_seeds}
        summary |= {"final_eval_return": stats(returns[-1][ok]), "best_eval_return": stats(best[ok])}
        summary |= {"sps": round(global_step / (time.time() - t0), 1), "jax_backend": jax.default_backend()}
        summary |= {f"{k}_time_s": round(float(t), 2) for k, t in zip(("train", "env", "eval"), times, strict=True)}
        summary["train_sps"] = round(global_step / times[0], 1)
        lines = {"eval (stochastic policy)": ("episodic_return", {}), "training episodes": ("train_return", {})}
        return run.finish(summary if ok.any() else None, {"episode return": lines}, f"DDPL on {env_id}")


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
