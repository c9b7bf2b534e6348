"""DDPL (Decentralized Diffusion Policy Learning, arXiv 2605.07101, Algorithm 2) on Multi-Agent MuJoCo (MaMuJoCo).

Every agent (a group of joints) has its own DDPM policy and twin averaged-Q critics Qbar_i(s, a_i) learned by TD, and
moves toward pi^t exp(eta Qbar_i) by importance-sampling score matching (ISSM, eq. 2). MuJoCo steps in numpy, so the
env loop is Python, in main; acting, buffer and updates are jitted. docs/algorithm.md, docs/ddpl_mamujoco.md"""

import contextlib
import csv
import importlib.util
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
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

try:  # importing gymnasium_robotics prints an Adroit notice on stderr: keep bad-input errors to one line
    with contextlib.redirect_stderr(io.StringIO()):
        from gymnasium_robotics import mamujoco_v1
        from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges
    MAMUJOCO_IMPORT_ERROR = None
except Exception as e:  # without mujoco, gymnasium raises DependencyNotInstalled, which is not an ImportError
    MAMUJOCO_IMPORT_ERROR = f"{type(e).__name__}: {e}"

UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta")
METRICS = ("episodic_return", "episode_length", "train_return", "q_first", "disc_return", *UPDATE_METRICS, "env_share")
PAPER_TASKS = ("Ant-2x4", "Ant-4x2", "Ant-8x1", "HumanoidStandup-17x1")
# gymnasium-robotics 1.4.2's partitions (obsk.get_parts_and_edges) but CoupledHalfCheetah-1p1, which it fails to build
LIBRARY_TASKS = "Ant-2x4 Ant-2x4d Ant-4x2 HalfCheetah-2x3 HalfCheetah-6x1 Hopper-3x1 Humanoid-9|8".split()
LIBRARY_TASKS += "HumanoidStandup-9|8 Pusher-3p Reacher-2x1 Swimmer-2x1 Walker2d-2x3".split()
# One joint per agent (the library has none): task -> (the partition whose nodes it takes, HARL's joint order); agent i
# drives joint i (docs/ddpl_mamujoco.md, "One joint per agent")
HUMANOID_JOINTS = "left_shoulder1 left_shoulder2 abdomen_x abdomen_y abdomen_z right_shoulder1 right_shoulder2".split()
HUMANOID_JOINTS += "right_elbow left_elbow left_hip_x left_hip_y left_hip_z right_hip_x right_hip_y right_hip_z".split()
HUMANOID_JOINTS += ["right_knee", "left_knee"]
ONE_JOINT_PER_AGENT = {"Ant-8x1": ("4x2", "hip1 ankle1 hip2 ankle2 hip3 ankle3 hip4 ankle4".split())}
ONE_JOINT_PER_AGENT |= {"Humanoid-17x1": ("9|8", HUMANOID_JOINTS), "HumanoidStandup-17x1": ("9|8", HUMANOID_JOINTS)}
DEFAULT_REWARD_SCALE = {"HumanoidStandup": 0.01}  # --reward-scale unless given (docs/ddpl_mamujoco.md)


@dataclass
class Args:
    exp_name: str = "ddpl_mamujoco"  # the name of this experiment (part of the run folder's name)
    seed: int = 0  # seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)
    num_seeds: int = 1  # independent runs in one process: vmapped parameters, num_seeds x num_envs MuJoCo envs
    track: bool = False  # log to Weights & Biases as well (one run, every metric per seed)
    wandb_project_name: str = "ddpl"  # the W&B project
    wandb_entity: str | None = None  # the W&B entity (team); None: your default
    save_model: bool = False  # write every seed's actor to runs/<run_name>/model.flax (benchmarks/evaluate.py plays it)
    runs_dir: str = "runs"  # parent folder of the run folder

    # Algorithm specific arguments
    task: str = "Ant-2x4"  # <scenario>-<partition>, e.g. Ant-2x4, Ant-4x2, Ant-8x1, HumanoidStandup-17x1 (the paper's)
    local_obs: bool = False  # per-agent partial observations; default: HARL's full observation plus one-hot agent id
    symlog_obs: bool = True  # policies and critics see sign(x) log(1 + |x|) of observations and state (ours)
    max_episode_steps: int = 1000  # episode time limit (MaMuJoCo's and HARL's); reaching it is truncation
    total_timesteps: int = 10_000_000  # environment steps per seed (each of the --num-envs envs counts; ours: HARL's)
    num_envs: int = 20  # parallel envs per seed, each stepped once per iteration (Table 3 "rollout batch size")
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
    reward_scale: float | None = None  # TD-target reward multiplier (ours); None: 0.01 on HumanoidStandup, else 1
    eval_every: int = 20_000  # environment steps between evaluations (one chunk of training each)
    num_eval_episodes: int = 10  # episodes per seed and evaluation, stochastic policy (ours: 10; the paper's 50)


# ALGO LOGIC: environment glue. num_envs MuJoCo envs in numpy; per-agent observations are gathered on the device.
def known_partition(task: str) -> bool:
    """A task the library's graph code knows: a built-in partition, ManySegment*-<agents>x<segments>, or ours."""
    try:
        return task in ONE_JOINT_PER_AGENT or len(get_parts_and_edges(*task.split("-", 1))[0]) > 0
    except Exception:
        return False


def valid_tasks() -> list[str]:
    many = ["ManySegmentAnt-<agents>x<segments>", "ManySegmentSwimmer-<agents>x<segments>"]
    return sorted(task for task in (*LIBRARY_TASKS, *ONE_JOINT_PER_AGENT) if known_partition(task)) + many


def make_library_env(task: str, **env_kwargs):
    """mamujoco_v1.parallel_env for a task; one-joint-per-agent tasks get HARL's partition as agent_factorization."""
    scenario, partition = task.split("-", 1)
    if task not in ONE_JOINT_PER_AGENT:
        return mamujoco_v1.parallel_env(scenario, partition, **env_kwargs)
    reference, labels = ONE_JOINT_PER_AGENT[task]
    parts, edges, globals_ = get_parts_and_edges(scenario, reference)
    nodes = {node.label: node for part in parts for node in part}
    factorization = {"partition": [(nodes[label],) for label in labels], "edges": edges, "globals": globals_}
    return mamujoco_v1.parallel_env(scenario, partition, agent_factorization=factorization, **env_kwargs)


def env_seed(*entropy: int) -> int:
    """A MuJoCo reset seed from integers (lane seed, stream, ...): independent streams for training and evaluation."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class MaMuJoCo:
    """num_envs copies of a task: states (E, S), learner actions in [-1, 1]^(E, N, A), agents' dims zero-padded.
    Steps the library's underlying gymnasium env and gathers observations from its state (docs: "Fast step")."""

    def __init__(self, task: str, num_envs: int, local_obs: bool, **env_kwargs):  # env_kwargs go to gymnasium.make
        self.envs = [make_library_env(task, **env_kwargs) for _ in range(num_envs)]
        lib, single = self.envs[0], self.envs[0].single_agent_env
        self.agents = lib.possible_agents
        self.num_agents = N = len(self.agents)
        self.state_dim = S = single.observation_space.shape[0]
        self.act_dim = A = max(len(part) for part in lib.agent_action_partitions)
        self.low, self.high = single.action_space.low, single.action_space.high  # per joint (HumanoidStandup: +-0.4)
        act_ids = np.full((N, A), -1)  # act_ids[i, j]: the env's index of agent i's j-th action (-1: padding)
        for i, part in enumerate(lib.agent_action_partitions):
            act_ids[i, : len(part)] = [node.act_ids for node in part]
        self.act_source = np.flatnonzero(act_ids >= 0)  # into the flattened (N * A) learner action
        self.act_target = act_ids.ravel()[self.act_source]  # into the env's action vector
        # observe() gathers from [state, 0, 1]: index S is a zero (padding, one-hot off), S + 1 a one (one-hot on)
        if local_obs:  # MaMuJoCo's own per-agent observation, as index arrays into the state
            mapping = lib.observation_factorization
            if mapping is None:
                raise ValueError("the library has no observation mapping for this task; drop --local-obs")
            self.obs_dim = max(len(mapping[a]) for a in self.agents)
            self.obs_index = np.full((N, self.obs_dim), S)
            for i, a in enumerate(self.agents):
                self.obs_index[i, : len(mapping[a])] = mapping[a]
            self.check_local_obs()
        else:  # HARL: the full observation (= state) plus a one-hot agent id
            self.obs_dim = S + N
            self.obs_index = np.concatenate([np.tile(np.arange(S), (N, 1)), S + np.eye(N, dtype=int)], axis=1)

    def observe(self, state) -> jax.Array:
        """Every agent's observation from the state: (..., S) -> (..., N, obs_dim)."""
        state = jnp.asarray(state, jnp.float32)
        extended = jnp.concatenate([state, jnp.zeros_like(state[..., :1]), jnp.ones_like(state[..., :1])], axis=-1)
        return extended[..., self.obs_index]

    def check_local_obs(self, steps: int = 10):
        """Refuses --local-obs where the gather differs from the library's builder (which transforms values there)."""
        lib, rng = self.envs[0], np.random.default_rng(0)
        lib.single_agent_env.reset(seed=0)
        for _ in range(steps):
            action = rng.uniform(-1.0, 1.0, (self.num_agents, self.act_dim))
            state = lib.single_agent_env.step(self.to_env_action(action))[0]
            library_obs, gathered = lib._get_obs(), np.asarray(self.observe(state))
            for i, a in enumerate(self.agents):
                if not np.array_equal(gathered[i, : len(library_obs[a])], library_obs[a].astype(np.float32)):
                    raise ValueError("the library's observation builder transforms values here; drop --local-obs")

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """Learner actions (..., N, A) in [-1, 1] (the sampler clips) -> the env's action vector, affinely per joint."""
        flat = np.zeros((*action.shape[:-2], self.low.shape[0]))
        flat[..., self.act_target] = action.reshape(*action.shape[:-2], -1)[..., self.act_source]
        return self.low + 0.5 * (flat + 1.0) * (self.high - self.low)

    def reset(self, seeds: list[int]) -> np.ndarray:
        return np.stack([env.single_agent_env.reset(seed=s)[0] for env, s in zip(self.envs, seeds, strict=True)])

    def step(self, action: np.ndarray) -> dict:
        """All envs one step: "next_state" is the true s' (buffered), "state" the reset one where an episode ended."""
        rows = []
        for i, env_action in enumerate(self.to_env_action(action)):
            next_state, reward, terminated, truncated = self.envs[i].single_agent_env.step(env_action)[:4]
            done = terminated or truncated  # Ant's fall is terminal (no bootstrap); the time limit only truncates
            state = self.envs[i].single_agent_env.reset()[0] if done else next_state  # unseeded: the env's own RNG
            rows.append((next_state, state, reward, terminated, done))
        keys = ("next_state", "state", "reward", "terminal", "done")
        return {k: np.asarray(v, np.float32) for k, v in zip(keys, zip(*rows, strict=True), strict=True)}


def buffer_init(size: int, N: int, S: int, A: int) -> dict:
    """Fixed-size replay arrays for N agents, an S-dim state and A-dim actions (observations: gathered when sampled)."""
    shapes = {"state": (S,), "action": (N, A), "reward": (), "terminal": (), "next_state": (S,)}
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


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


# ALGO LOGIC: Algorithm 2. One iteration: every env steps once (Python), then U updates of every agent (jitted).
def make_train(args: Args, env: MaMuJoCo) -> SimpleNamespace:
    """Per-seed init, act, learn, policy and critic_value (callers jit and vmap them over seeds), and the chunking."""
    N, S, D, A = env.num_agents, env.state_dim, env.obs_dim, env.act_dim  # agents, state, (padded) obs and actions
    E, B, M = args.num_envs, args.batch_size, args.num_action_samples
    Bp = args.issm_batch_size or max(1, B // M)  # ISSM states: sampler rows K (B + Bp M), not K B (1 + M)
    iters_per_chunk, num_chunks = args.eval_every // E, args.total_timesteps // (args.eval_every // E * E)
    num_updates = max(1, args.updates_per_iteration * (num_chunks * iters_per_chunk - args.learning_starts // E))
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    score_net, critic_net = ScoreNet(action_dim=A, hidden=args.hidden_size), TwinCritic(hidden=args.hidden_size)
    tx = optax.adam(optax.linear_schedule(args.learning_rate, args.learning_rate_end, num_updates))  # Table 3, all nets
    squash = symlog if args.symlog_obs else (lambda x: x)

    observe = lambda state: squash(env.observe(state))  # noqa: E731  (..., S) -> the agents' observations (..., N, D)

    def policy(actor, state, key):
        """Decentralized execution: agent i samples a_i ~ pi_i(.|o_i), o_i gathered from the state. -> (..., N, A)."""
        sample = jax.vmap(lambda p, o, k: sample_actions(score_net.apply, p, o, k, sched, A))
        return jnp.moveaxis(sample(actor, jnp.moveaxis(observe(state), -2, 0), jax.random.split(key, N)), 0, -2)

    def init(seed):
        key, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        init_actor = jax.vmap(score_net.init, (0, None, None, None))  # agents: a stacked leading axis of parameters
        actor = init_actor(jax.random.split(k_actor, N), jnp.zeros((1, A)), jnp.ones(1, jnp.int32), jnp.zeros((1, D)))
        init_critic = jax.vmap(critic_net.init, (0, None, None))
        critic = init_critic(jax.random.split(k_critic, N), jnp.zeros((1, S)), jnp.zeros((1, A)))
        learner = {"actor": actor, "critic": critic, "critic_target": critic}
        learner |= {"actor_opt": jax.vmap(tx.init)(actor), "critic_opt": jax.vmap(tx.init)(critic)}
        learner["temp"] = {"log_eta": jnp.zeros(N), "q_scale": jnp.zeros(N)}  # issm_temperature's state per agent
        return {"learner": learner, "buffer": buffer_init(args.buffer_size, N, S, A), "key": key}

    def act(actor, key, state, iteration):
        """Actions of the E envs, (E, N, A); iteration is not vmapped over seeds, so the cond stays a real branch."""
        key, k_act = jax.random.split(key)
        warm_up = lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0)  # noqa: E731
        return key, jax.lax.cond(iteration * E < args.learning_starts, warm_up, lambda: policy(actor, state, k_act))

    def update_agent(p, mine, shared, key):
        """Critic and ISSM step of one agent (vmapped); mine: o_i, a_i, o_i'; shared: s, s', r, terminal."""
        k_next, k_prop, k_dsm = jax.random.split(key, 3)
        # Averaged-Q critic (Alg. 2, line 5): state and OWN action; a_i' ~ pi_i(.|o_i') from the sampler
        next_action = sample_actions(score_net.apply, p["actor"], mine["next_obs"], k_next, sched, A)
        q_next = jnp.minimum(*critic_net.apply(p["critic_target"], shared["next_state"], next_action))
        # TD bootstraps on 1 - terminal: Ant's fall ends the return, the time limit does not (s' is the true last one)
        y = shared["reward"] * args.reward_scale + args.gamma * (1.0 - shared["terminal"]) * q_next

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
        mine = {"obs": observe(batch["state"]), "action": batch["action"], "next_obs": observe(batch["next_state"])}
        mine = {k: jnp.swapaxes(v, 0, 1) for k, v in mine.items()}  # agents first
        shared = {"state": squash(batch["state"]), "next_state": squash(batch["next_state"])}
        shared |= {"reward": batch["reward"], "terminal": batch["terminal"]}
        update_all = jax.vmap(update_agent, in_axes=(0, 0, None, 0))  # agents
        learner, metrics = update_all(rs["learner"], mine, shared, jax.random.split(k_agents, N))
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

    def critic_value(critic, state, action):
        """The critic check: min(Q1, Q2)(s_0, a_i0) of the evaluation episodes' first step, mean over agents."""
        q = jax.vmap(lambda c, a: jnp.minimum(*critic_net.apply(c, squash(state), a)))
        return q(critic, jnp.swapaxes(action, 0, 1)).mean()

    functions = {"init": init, "act": act, "learn": learn, "policy": policy, "critic_value": critic_value}
    sizes = {"iters_per_chunk": iters_per_chunk, "steps_per_chunk": iters_per_chunk * E, "num_chunks": num_chunks}
    return SimpleNamespace(**functions, **sizes, state_dim=S)


# ALGO LOGIC: evaluation. MuJoCo steps in this process between calls of the jitted, seed-vmapped policy.
def make_evaluate(args: Args, train: SimpleNamespace, seeds: list[int]):
    """main's evaluation, which benchmarks/evaluate.py replays from a model.flax: --num-eval-episodes envs per seed and
    the policy compiled ahead of time for the actor's shapes, so both run the same program (bit for bit on CPU)."""
    n, S = args.num_eval_episodes, train.state_dim  # eval envs per seed: one episode each
    envs = MaMuJoCo(args.task, len(seeds) * n, args.local_obs, max_episode_steps=args.max_episode_steps)
    actor = jax.eval_shape(jax.vmap(train.init), jnp.asarray(seeds, jnp.int32))["learner"]["actor"]
    shapes = (jax.ShapeDtypeStruct((len(seeds), n, S), jnp.float32), jax.ShapeDtypeStruct((len(seeds), 2), jnp.uint32))
    act = jax.jit(jax.vmap(lambda p, s, key, t: train.policy(p, s, jax.random.fold_in(key, t)), (0, 0, 0, None)))
    act = act.lower(actor, *shapes, np.int32(0)).compile()

    def evaluate(actor, global_step: int):
        """One episode per eval env, stochastic policy (Sec. 5), env seeds and action keys from (seed, global_step) ->
        per seed the mean return, length, discounted return (sum_t gamma^t reward_scale r_t), first states, actions."""
        state = envs.reset([env_seed(s, 1, global_step, i) for s in seeds for i in range(n)])
        state = state.reshape(len(seeds), n, S).astype(np.float32)
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), global_step) for s in seeds])
        running, (ret, length, disc) = np.ones((len(seeds), n), bool), np.zeros((3, len(seeds), n))
        first_state, first_action, lib = state.copy(), None, [e.single_agent_env for e in envs.envs]
        for t in range(args.max_episode_steps):
            action = np.asarray(act(actor, state, keys, np.int32(t)))
            first_action = action if first_action is None else first_action
            env_action = envs.to_env_action(action)
            for s, i in zip(*np.nonzero(running), strict=True):  # finished envs are not stepped (their action: ignored)
                next_state, reward, terminated, truncated = lib[s * n + i].step(env_action[s, i])[:4]
                state[s, i], ret[s, i], length[s, i] = next_state, ret[s, i] + reward, t + 1
                disc[s, i] += args.gamma**t * args.reward_scale * reward
                running[s, i] = not (terminated or truncated)
            if not running.any():
                break
        return ret.mean(axis=1), length.mean(axis=1), disc.mean(axis=1), first_state, first_action

    return evaluate


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
    if MAMUJOCO_IMPORT_ERROR:
        return f"MaMuJoCo unavailable (pip install gymnasium-robotics==1.4.2 mujoco==4.0.0): {MAMUJOCO_IMPORT_ERROR}"
    if not known_partition(args.task):
        return f"--task: unknown {args.task!r}; valid tasks: {', '.join(valid_tasks())}"
    minimum = dict.fromkeys(("num_seeds", "num_envs", "batch_size", "hidden_size", "num_diffusion_steps"), 1)
    minimum |= {"num_eval_episodes": 1, "max_episode_steps": 1, "updates_per_iteration": 0, "learning_starts": 0}
    for name, low in (minimum | {"buffer_size": args.num_envs, "num_action_samples": 2}).items():
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
    try:  # the library builds the env, and with --local-obs the index gather must equal its observations
        MaMuJoCo(args.task, 1, args.local_obs, max_episode_steps=args.max_episode_steps)
    except Exception as e:
        return f"--task {args.task}{' --local-obs' if args.local_obs else ''}: {type(e).__name__}: {e}"
    if not 0 <= args.issm_batch_size <= args.batch_size:
        return f"--issm-batch-size must be 0 (--batch-size // M) or 1..--batch-size, got {args.issm_batch_size}"
    if not (0 <= args.target_ess < 1 and 0 <= args.proposal_mix < 1):  # target_ess 0: fixed eta; mix 0: all from pi^t
        return f"need 0 <= --target-ess < 1 and 0 <= --proposal-mix < 1, got {args.target_ess}, {args.proposal_mix}"
    if not args.num_envs <= args.eval_every <= args.total_timesteps:
        got = f"{args.num_envs}, {args.eval_every}, {args.total_timesteps}"
        return f"need --num-envs <= --eval-every <= --total-timesteps, got {got}"
    positive = (args.tau, args.learning_rate, args.learning_rate_end, args.reward_scale or 1.0)  # None: the default
    if not (0 <= args.gamma <= 1 and args.tau <= 1 and min(positive) > 0 and args.eta >= 0 and args.reward_scale != 0):
        return "need 0 <= --gamma <= 1, 0 < --tau <= 1, --eta >= 0; --learning-rate(-end), --reward-scale > 0"
    if args.track and importlib.util.find_spec("wandb") is None:
        return "--track needs the wandb package (pip install wandb), which is not installed"
    return None


def main(args: Args) -> int:
    if error := validate(args):  # nothing is written before the flags are known to be valid
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.reward_scale is None:  # the task's default, resolved before config.json records it
        args = replace(args, reward_scale=DEFAULT_REWARD_SCALE.get(args.task.split("-")[0], 1.0))
    # TRY NOT TO MODIFY: build and compile; each chunk: the env loop, evaluate, log, progress; then save and summarise
    env_id, seeds, E = f"MaMuJoCo_{args.task}", list(range(args.seed, args.seed + args.num_seeds)), args.num_envs
    run, start = RunFolder(args, env_id.replace("|", "_"), METRICS), time.time()  # Humanoid-9|8: no | in the folder
    env = MaMuJoCo(args.task, len(seeds) * E, args.local_obs, max_episode_steps=args.max_episode_steps)  # all seeds'
    train = make_train(args, env)
    evaluate = make_evaluate(args, train, seeds)  # benchmarks/evaluate.py replays it from model.flax
    rs = jax.jit(jax.vmap(train.init))(jnp.asarray(seeds, jnp.int32))
    gb = sum(x.nbytes for x in jax.tree.leaves(rs["buffer"])) / 1e9  # the replay buffers, on the device
    print(f"{env_id}: {env.num_agents} agents, obs {env.obs_dim}, state {env.state_dim}; buffer {gb:.2f} GB; compiling")
    state = env.reset([env_seed(s, 0, i) for s in seeds for i in range(E)]).reshape(len(seeds), E, -1)
    state = state.astype(np.float32)  # (seed, env, S): what the policies see
    act, critic_value = jax.jit(jax.vmap(train.act, in_axes=(0, 0, 0, None))), jax.jit(jax.vmap(train.critic_value))
    act = act.lower(rs["learner"]["actor"], rs["key"], state, np.int32(0)).compile()
    example = {"state": state, "next_state": state, "reward": state[..., 0], "terminal": state[..., 0]}
    example["action"] = np.zeros((len(seeds), E, env.num_agents, env.act_dim), np.float32)
    learn = jax.jit(jax.vmap(train.learn, in_axes=(0, 0, None)), donate_argnums=0)  # the buffer is updated in place
    learn = learn.lower(rs, example, np.int32(0)).compile()
    print(f"compiled in {time.time() - start:.0f} s; {train.num_chunks} chunks x {train.steps_per_chunk} steps")
    start, returns, times = time.time(), [], np.zeros(3)  # seconds: training (MuJoCo included), MuJoCo, evaluation
    ep_return, n = np.zeros((len(seeds), E)), train.iters_per_chunk
    bar = tqdm(total=train.num_chunks * train.steps_per_chunk, unit="step", desc=f"{args.num_seeds} seed(s)")
    for chunk in range(train.num_chunks):
        chunk_start, env_time, updates, ep_stats = time.time(), 0.0, [], np.zeros((2, len(seeds)))
        for iteration in range(chunk * n, (chunk + 1) * n):  # --eval-every env steps per seed
            key, action = act(rs["learner"]["actor"], rs["key"], state, np.int32(iteration))
            action, env_start = np.asarray(action), time.time()  # (seed, env, N, A), in [-1, 1]
            out = env.step(action.reshape(len(seeds) * E, *action.shape[2:]))  # MuJoCo: every env in turn
            out = {k: v.reshape(len(seeds), E, *v.shape[1:]) for k, v in out.items()}
            env_time += time.time() - env_start
            transitions = {k: out[k] for k in ("next_state", "reward", "terminal")} | {"state": state, "action": action}
            ep_return += out["reward"]
            ep_stats += [(ep_return * out["done"]).sum(axis=1), out["done"].sum(axis=1)]
            ep_return, state = ep_return * (1.0 - out["done"]), out["state"]
            rs, metrics, updated = learn(rs | {"key": key}, transitions, np.int32(iteration))
            updates.append((metrics, updated))
            bar.update(E)
        jax.block_until_ready(rs["learner"])  # the last update, dispatched asynchronously, counts as training
        train_time, global_step = time.time() - chunk_start, (chunk + 1) * train.steps_per_chunk
        ret, length, disc, first_state, first_action = evaluate(rs["learner"]["actor"], global_step)
        q_first = critic_value(rs["learner"]["critic"], first_state, first_action)  # the critic check against disc
        times += (train_time, env_time, time.time() - chunk_start - train_time)
        metrics, updated = (np.stack(x, axis=1) for x in zip(*jax.device_get(updates), strict=True))
        count = updated.sum(axis=1, keepdims=True)  # (seed, 1): iterations of this chunk with updates
        mean = np.where(count > 0, (metrics * updated[..., None]).sum(axis=1) / np.maximum(count, 1), np.nan)
        metrics = dict(zip(UPDATE_METRICS, mean.T, strict=True)) | {"q_first": q_first, "disc_return": disc}
        metrics |= {"train_return": np.where(ep_stats[1] > 0, ep_stats[0] / np.maximum(ep_stats[1], 1), np.nan)}
        env_share = np.full_like(ret, env_time / train_time)  # MuJoCo's share of this chunk's training time
        metrics |= {"episodic_return": ret, "episode_length": length, "env_share": env_share}
        ok = run.log(global_step, seeds, metrics, rs["learner"], global_step / (time.time() - start))
        returns.append(ret)
        bar.set_postfix(eval=f"{ret[ok].mean():.2f}")
        if not ok.any():
            break  # every seed diverged
    bar.close()
    if args.save_model:  # every seed's actor and the flags that rebuild it (benchmarks/evaluate.py)
        model = {"actor": rs["learner"]["actor"], "global_step": global_step, "config": json.dumps(asdict(args))}
        with open(os.path.join(run.dir, "model.flax"), "wb") as f:
            f.write(flax.serialization.to_bytes(model | {"script": os.path.basename(__file__)}))
    (train_s, env_s, eval_s), train_sps = times, round(global_step / times[0], 1)
    print(f"training {train_s:.0f} s ({train_sps} steps/s per seed, MuJoCo {env_s / train_s:.1%}), eval {eval_s:.0f} s")
    best = max(returns, key=lambda r: r[ok].mean())  # Table 1: the best mean eval return during training
    summary = {"env_id": env_id, "total_timesteps": global_step, "num_seeds": args.num_seeds}
    summary |= {"final_eval_return": stats(returns[-1][ok]), "best_eval_return": stats(best[ok])}
    summary |= {"sps": round(global_step / (time.time() - start), 1), "train_sps": train_sps}
    summary |= dict(zip(("train_time_s", "env_time_s", "eval_time_s"), times.round(2).tolist(), strict=True))
    lines = {"eval (stochastic policy)": ("episodic_return", {}), "training episodes": ("train_return", {})}
    return run.finish(summary if ok.any() else None, {"episode return": lines}, f"DDPL on {env_id}")


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
