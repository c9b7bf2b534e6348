"""DDPL (Decentralized Diffusion Policy Learning, arXiv 2605.07101, Algorithm 2) on IsaacLab's bimanual Shadow Hand.

Two agents, the right and the left hand of Isaac-Shadow-Hand-Over-Direct-v0 (a DirectMARLEnv), each act with their
own DDPM policy on their own observation; twin averaged-Q critics Qbar_i(s, a_i) on the env's state() and the agent's
own action are learned by TD; every policy moves toward pi^t exp(eta Qbar_i) by importance-sampling score matching
(ISSM, eq. 2). Isaac Sim steps thousands of envs on the GPU in torch; the env loop is Python, tensors cross between
torch and JAX by DLPack (no host copies), and action selection, the replay buffer and the updates are jitted, with
seeds and agents vmapped. Isaac Sim needs an RTX-class NVIDIA GPU: on other machines the script exits with code 2.
The training loop `train(args, env)` takes any object with the DirectMARLEnv surface (tests/ use a torch stand-in).
Flags, install steps, metrics and what was verified: docs/ddpl_isaaclab.md.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: Isaac Sim and torch share the GPU

import contextlib
import csv
import importlib.util
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

NOISE_SCHEDULES = ("linear", "cosine", "vp")
WEIGHT_RULES = ("state", "batch", "raw")  # --weight-rule: the scale of Qbar in the ISSM softmax
UPDATE_METRICS = ("critic_loss", "actor_loss", "q_mean", "max_weight", "weight_ess", "eta")
METRICS = ("episodic_return", "episode_length", "train_return", *UPDATE_METRICS, "env_share")
POLICY_FIELDS = ("task", "hidden_size", "num_diffusion_steps", "noise_schedule")  # what a checkpoint fixes
INSTALL_HINT = "see docs/ddpl_isaaclab.md: pip install -r requirements-isaaclab.txt on an RTX-class NVIDIA GPU machine"


@dataclass
class Args:
    exp_name: str = "ddpl_isaaclab"
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 0
    """seed of the first lane; lane i of --num-seeds uses seed + i (the `seed` column of metrics.csv)"""
    num_seeds: int = 1
    """independent runs in one process: vmapped parameters; Isaac Sim hosts num_seeds x num_envs envs"""
    track: bool = False
    """log to Weights & Biases as well (one W&B run per seed)"""
    wandb_project_name: str = "ddpl"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team); None: your default"""
    save_model: bool = False
    """write all seeds' actor parameters to runs/<run_name>/model.flax (flax.serialization, no pickle)"""
    checkpoint: str | None = None
    """a model.flax written by --save-model; with --eval-only, evaluate it without training"""
    eval_only: bool = False
    """evaluate --checkpoint: one episode in each of the --num-envs envs per seed"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    device: str = "cuda:0"
    """the GPU that Isaac Sim, torch and JAX share (AppLauncher's and the env config's device)"""

    # Algorithm specific arguments
    task: str = "Isaac-Shadow-Hand-Over-Direct-v0"
    """an IsaacLab DirectMARLEnv task id (only the Shadow Hand over task was designed for)"""
    total_timesteps: int = 20_000_000
    """environment steps per seed (each of the --num-envs envs counts; ours)"""
    num_envs: int = 256
    """parallel envs per seed (ours: IsaacLab's default 2048 gives 8x fewer updates per env step)"""
    buffer_size: int = 500_000
    """replay buffer capacity in transitions per seed (ours; ~2.5 GB of GPU memory on the Shadow Hand); circular"""
    learning_starts: int = 25_600
    """environment steps (all envs of a seed) of uniform random actions before the first update (ours)"""
    updates_per_iteration: int = 4
    """U: gradient updates after each vector step (ours; 0 only collects data, for profiling)"""
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
    """width of the 3 mish layers of score networks and critics (Table 3)"""
    num_diffusion_steps: int = 20
    """K: denoising steps of every policy (Table 3)"""
    noise_schedule: str = "cosine"
    """linear, cosine or vp (ours: cosine; Table 3's linear 0.001->0.999 makes narrow policies 3x too wide)"""
    eta: float = 1.0
    """DecSPG step eta of the target pi^t exp(eta Qbar) (Table 3 "diffusion policy update lr")"""
    num_action_samples: int = 4
    """M: actions per state drawn from pi^t for ISSM; >= 2 since weights are normalised per state (ours)"""
    issm_batch_size: int = 0
    """B_p: states of the batch whose M proposals train the ISSM step (ours; the critic step uses all B);
    0: batch_size // num_action_samples, so the weighted DSM sees B samples as plain DSM does (docs/benchmarks.md)"""
    weight_rule: str = "state"
    """Qbar's scale in the ISSM softmax (ours, ALGORITHM.md sec. 4): state (each state's std over its M samples),
    batch (one running scale for all states: the mean within-state std), raw (Qbar as it is)"""
    target_ess: float = 0.0
    """0: fixed eta; in (0, 1): eta adapts so the weights' mean effective sample size / M holds at this target"""
    reward_scale: float = 1.0
    """multiplies the team reward in the TD target (ours; the over task's reward is at most ~2 per step)"""
    eval_every: int = 512_000
    """environment steps per seed between evaluations (one episode in every env, then training resumes)"""


def parse_args() -> Args:
    """tyro.cli(Args), with tyro's boxed multi-line parse errors condensed to one line on stderr (exit 2)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(Args)
    except SystemExit as e:
        if e.code:
            lines = [ln.strip("│╭╮╰╯─ ") for ln in err.getvalue().splitlines()][1:]  # the box's first paragraph
            message = " ".join(lines[: lines.index("")] if "" in lines else lines) or "invalid command line"
            print(f"error: {message} (see --help)", file=sys.stderr)
        raise


def load_checkpoint(path: str) -> dict:
    """{"actor": params with leading (seed, agent) axes, "global_step", "config"} from a --save-model file."""
    with open(path, "rb") as f:
        ckpt = flax.serialization.msgpack_restore(f.read())
    ckpt["config"] = json.loads(ckpt["config"])
    missing = [k for k in POLICY_FIELDS if k not in ckpt["config"]] + [
        k for k in ("actor", "global_step") if k not in ckpt
    ]
    if missing:
        raise ValueError(f"missing {missing}")
    return ckpt


def missing_isaac() -> str | None:
    """What of the IsaacLab stack this Python lacks (checked without importing it), or None."""
    missing = [
        name for name in ("torch", "isaacsim", "isaaclab", "isaaclab_tasks") if not importlib.util.find_spec(name)
    ]
    return ", ".join(missing) or None


def validate(args: Args) -> str | None:
    """Return a one-line description of the first invalid flag, or None. Runs before anything is written."""
    if args.eval_only != bool(args.checkpoint):  # resuming training from a checkpoint is not supported
        return "--eval-only and --checkpoint PATH (a model.flax written by --save-model) go together"
    if args.checkpoint:
        try:
            load_checkpoint(args.checkpoint)
        except Exception as e:
            return f"--checkpoint: cannot read {args.checkpoint!r} as a model.flax ({type(e).__name__}: {e})"
    if args.noise_schedule not in NOISE_SCHEDULES:
        return f"--noise-schedule: unknown {args.noise_schedule!r}; choose from {', '.join(NOISE_SCHEDULES)}"
    if not 0 <= args.issm_batch_size <= args.batch_size:
        return f"--issm-batch-size must be 0 (--batch-size // M) or 1..--batch-size, got {args.issm_batch_size}"
    if args.weight_rule not in WEIGHT_RULES:
        return f"--weight-rule: unknown {args.weight_rule!r}; choose from {', '.join(WEIGHT_RULES)}"
    if not 0 <= args.target_ess < 1:
        return f"--target-ess must be 0 (fixed eta) or in (0, 1), got {args.target_ess}"
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


# ALGO LOGIC: environment glue. Dicts of torch tensors keyed by agent <-> stacked JAX arrays, on the env's device.
def to_jax(tensor) -> jax.Array:
    """A torch tensor as a JAX array through DLPack: no copy on the same device. Bools first become float32 (DLPack
    import of bool tensors is not supported everywhere); non-contiguous views become contiguous on their device."""
    if not tensor.dtype.is_floating_point:
        tensor = tensor.float()
    return jax.dlpack.from_dlpack(tensor.contiguous())


class IsaacAdapter:
    """A DirectMARLEnv with num_seeds x E envs as per-seed stacked arrays: observations (seed, E, N, D) zero-padded
    to the largest agent's D, state (seed, E, S), learner actions (seed, E, N, A) in [-1, 1] (padding dropped).

    IsaacLab resets finished envs inside step(): the observations and state() it returns for them are the next
    episode's first ones, and the true last observation is gone. step() reports "terminal" (an agent's `terminated`:
    the ball fell), "truncated" (a time-out without termination) and "done"; the learner masks the TD error of
    truncated transitions instead of bootstrapping from the next episode's state (make_train, critic_loss).
    """

    def __init__(self, env, num_seeds: int):
        import torch

        self.torch, self.env = torch, env
        self.base = base = getattr(env, "unwrapped", env)  # gym.make wraps the DirectMARLEnv
        self.agents = list(getattr(base, "possible_agents", None) or base.observation_spaces)
        self.num_agents = len(self.agents)
        self.obs_dims = [int(base.observation_spaces[a].shape[0]) for a in self.agents]
        self.act_dims = [int(base.action_spaces[a].shape[0]) for a in self.agents]
        self.obs_dim, self.act_dim = max(self.obs_dims), max(self.act_dims)
        if base.num_envs % num_seeds:
            raise ValueError(f"{base.num_envs} envs cannot be split into {num_seeds} seeds")
        self.num_seeds, self.num_envs = num_seeds, base.num_envs // num_seeds
        self.max_episode_length = int(base.max_episode_length)
        self.state_dim = None  # known after the first reset

    def _lanes(self, x: jax.Array) -> jax.Array:  # (num_seeds * E, ...) -> (num_seeds, E, ...)
        return x.reshape(self.num_seeds, self.num_envs, *x.shape[1:])

    def _obs(self, obs: dict) -> jax.Array:
        pad = [
            jnp.pad(to_jax(obs[a]), ((0, 0), (0, self.obs_dim - d)))
            for a, d in zip(self.agents, self.obs_dims, strict=True)
        ]
        return self._lanes(jnp.stack(pad, axis=1))

    def _state(self) -> jax.Array:
        state = self._lanes(to_jax(self.base.state()))
        self.state_dim = state.shape[-1]
        return state

    def reset(self) -> dict:
        obs, _ = self.env.reset()
        return {"obs": self._obs(obs), "state": self._state()}

    def step(self, action: jax.Array) -> dict:
        """All envs one step: "obs"/"state" are what the policies see next (post-reset where an episode ended)."""
        agents_first = jnp.moveaxis(action.reshape(-1, self.num_agents, self.act_dim), 1, 0)  # (N, seed*E, A)
        actions = self.torch.from_dlpack(agents_first)  # one tensor for all agents, no copy
        actions = {a: actions[i, :, :d] for i, (a, d) in enumerate(zip(self.agents, self.act_dims, strict=True))}
        obs, rewards, terminated, time_outs, _ = self.env.step(actions)
        # the hands share one reward (identical per agent in the over task): the team reward is their mean
        reward = jnp.stack([to_jax(rewards[a]).reshape(-1) for a in self.agents]).mean(axis=0)
        terminal = jnp.stack([to_jax(terminated[a]).reshape(-1) for a in self.agents]).max(axis=0)
        time_out = jnp.stack([to_jax(time_outs[a]).reshape(-1) for a in self.agents]).max(axis=0)
        truncated = time_out * (1.0 - terminal)
        out = {"obs": self._obs(obs), "state": self._state(), "reward": reward, "terminal": terminal}
        out |= {"truncated": truncated, "done": jnp.maximum(terminal, truncated)}
        return out | {k: self._lanes(out[k]) for k in ("reward", "terminal", "truncated", "done")}


def check_devices(env) -> str | None:
    """JAX must sit on the GPU that the env's tensors live on, else DLPack cannot share them: None when it does."""
    device = str(getattr(env, "unwrapped", env).device)
    if device.startswith("cuda") and jax.default_backend() != "gpu":
        return (f"the env's tensors are on {device} but JAX runs on {jax.default_backend()} (devices {jax.devices()}): "
                "install JAX's CUDA build (pip install 'jax[cuda12]==0.5.3', docs/ddpl_isaaclab.md)")  # fmt: skip
    return None


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


# ALGO LOGIC: Algorithm 2. One iteration: every env steps once (Isaac Sim), then U updates of every agent (jitted).
def make_train(args: Args, env: IsaacAdapter, num_iterations: int):
    """Returns init(seed), act(actor, key, obs, iteration), learn(runner state, transitions, iteration) and
    policy(actor, obs, key). All are per seed; train() jits and vmaps them over seeds and runs the env loop."""
    N, S, D, A = env.num_agents, env.state_dim, env.obs_dim, env.act_dim  # agents, state, (padded) obs and actions
    E, B, M = env.num_envs, args.batch_size, args.num_action_samples
    Bp = args.issm_batch_size or max(1, B // M)  # ISSM states: sampler rows K (B + Bp M), not K B (1 + M)
    num_updates = max(1, args.updates_per_iteration * (num_iterations - args.learning_starts // E))
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    score_net = ScoreNet(action_dim=A, hidden=args.hidden_size)
    critic_net = TwinCritic(hidden=args.hidden_size)
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
        action = jax.lax.cond(
            iteration * E < args.learning_starts,  # warm-up: uniform random actions
            lambda: jax.random.uniform(k_act, (E, N, A), minval=-1.0, maxval=1.0),
            lambda: policy(actor, obs, k_act),
        )
        return key, action

    def update_agent(p, mine, shared, key):
        """One critic step and one ISSM step of one agent (vmapped over agents).

        p: the agent's parameters and optimiser states; mine: its own o_i, a_i, o_i' (B rows each); shared: the
        states s and s', the team reward, terminal and truncated.
        """
        k_next, k_prop, k_dsm = jax.random.split(key, 3)
        # Averaged-Q critic (Alg. 2, line 5): state and OWN action; a_i' ~ pi_i(.|o_i') from the sampler
        next_action = sample_actions(score_net.apply, p["actor"], mine["next_obs"], k_next, sched, A)
        q_next = jnp.minimum(*critic_net.apply(p["critic_target"], shared["next_state"], next_action))
        # TD bootstraps on 1 - terminal: the ball's fall ends the return. A time-out does not, but IsaacLab's s' of a
        # timed-out env is the NEXT episode's first state, so those rows carry no TD error at all (mask, ours)
        y = shared["reward"] * args.reward_scale + args.gamma * (1.0 - shared["terminal"]) * q_next
        mask = 1.0 - shared["truncated"]

        def critic_loss(params):
            q1, q2 = critic_net.apply(params, shared["state"], mine["action"])
            td = mask * ((q1 - y) ** 2 + (q2 - y) ** 2)
            return td.sum() / jnp.maximum(mask.sum(), 1.0), q1.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(p["critic"])
        updates, critic_opt = tx.update(grads, p["critic_opt"])
        critic = optax.apply_updates(p["critic"], updates)
        # ISSM (eq. 2) on the first B_p states of the batch (a uniform subset: rows are drawn i.i.d.): M proposals
        # per state from pi^t (no gradient flows through the sampler), self-normalised weights softmax_j(eta * Qbar)
        # with Qbar = min of the twin ONLINE critics, just updated above. Truncated
        # rows keep their (true) state s here: only their s' is wrong.
        obs, state = mine["obs"][:Bp], shared["state"][:Bp]
        proposals = sample_actions(
            score_net.apply, p["actor"], jnp.broadcast_to(obs[:, None], (Bp, M, D)), k_prop, sched, A
        )
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
            rs, metrics = jax.lax.scan(
                lambda r, k: update(r, iteration, k), rs, jax.random.split(k_upd, args.updates_per_iteration)
            )
            return rs, metrics.mean(axis=0), jnp.float32(1.0)

        def no_updates(rs):
            return rs, jnp.zeros(len(UPDATE_METRICS)), jnp.float32(0.0)

        do_learn = ((iteration + 1) * E >= args.learning_starts) & (args.updates_per_iteration > 0)
        return jax.lax.cond(do_learn, updates, no_updates, rs)

    return init, act, learn, policy


@jax.jit
def track_episodes(ep, reward, done):
    """Running returns and lengths (seed, E); finished episodes' sums and counts are added to ep["sum_*"]/"count"."""
    ret, length = ep["ret"] + reward, ep["len"] + 1.0
    ep = ep | {"sum_ret": ep["sum_ret"] + (ret * done).sum(-1), "sum_len": ep["sum_len"] + (length * done).sum(-1)}
    return ep | {"count": ep["count"] + done.sum(-1), "ret": ret * (1.0 - done), "len": length * (1.0 - done)}


def evaluate(env: IsaacAdapter, eval_act, actor, seeds: list[int], global_step: int):
    """Mean return and length of the first episode of every env (stochastic policy, Sec. 5), from a fresh reset.

    Isaac Sim hosts one set of envs, so evaluation borrows the training envs and training resumes from a reset.
    Action keys depend only on (seed, global_step); Isaac Sim's physics need not be bit-reproducible on a GPU.
    """
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), global_step) for s in seeds])
    obs = env.reset()["obs"]
    shape = (len(seeds), env.num_envs)
    running, ret, length = jnp.ones(shape), jnp.zeros(shape), jnp.zeros(shape)
    for t in range(env.max_episode_length):
        out = env.step(eval_act(actor, obs, keys, np.int32(t)))
        ret, length = ret + running * out["reward"], length + running
        running, obs = running * (1.0 - out["done"]), out["obs"]
        if t % 32 == 31 and not bool(running.any()):  # an occasional sync only
            break
    return np.asarray(ret.mean(axis=1)), np.asarray(length.mean(axis=1))


# TRY NOT TO MODIFY: logging, saving, evaluation-only and the summary
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


def plot_curve(rows: list[dict], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["global_step"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("episodic_return", "tab:blue"), ("train_return", "tab:gray")):
        by_step = [[r[name] for r in rows if r["global_step"] == s] for s in steps]  # "" where nothing was logged
        values = np.array([[np.nan if v == "" else float(v) for v in vs] for vs in by_step])
        if np.all(np.isnan(values)):
            continue
        mean, std = values.mean(axis=1), values.std(axis=1)  # NaN (no data) leaves a gap
        label = "eval (stochastic policy)" if name == "episodic_return" else "training episodes"
        ax.plot(steps, mean, "o-" if len(steps) == 1 else "-", color=color, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
    ax.set(xlabel="environment steps per seed", ylabel=f"episode return (mean, std of {values.shape[1]} seeds)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args: Args, env) -> int:
    """DDPL on `env`, an object with the DirectMARLEnv surface (reset/step/state, observation_spaces/action_spaces,
    num_envs, device, max_episode_length) holding num_seeds x num_envs envs. Writes runs/<run_name>/; returns 0,
    2 (bad input or devices) or 130 (Ctrl-C)."""
    if error := validate(args) or check_devices(env):
        print(f"error: {error}", file=sys.stderr)
        return 2
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    if args.eval_only:  # the policy's architecture comes from the checkpoint
        args = replace(args, **{k: ckpt["config"][k] for k in POLICY_FIELDS})
    env = IsaacAdapter(env, args.num_seeds)
    if env.num_envs != args.num_envs:
        print(f"error: the env holds {env.num_envs} envs per seed, not --num-envs {args.num_envs}", file=sys.stderr)
        return 2
    env_id = f"IsaacLab_{args.task}"
    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    script_start = time.time()

    seeds = list(range(args.seed, args.seed + args.num_seeds))
    E = args.num_envs
    first = env.reset()
    iters_per_chunk = args.eval_every // E
    num_chunks = args.total_timesteps // (iters_per_chunk * E)
    steps_per_chunk = iters_per_chunk * E
    init, act, learn, policy = make_train(args, env, num_chunks * iters_per_chunk)
    seeds_arr = jnp.asarray(seeds, jnp.int32)
    rs_shape = jax.eval_shape(jax.vmap(init), seeds_arr)
    eval_act = jax.jit(jax.vmap(lambda actor, obs, key, t: policy(actor, obs, jax.random.fold_in(key, t)),
                                in_axes=(0, 0, 0, None)))  # fmt: skip
    wandb_runs = []
    if args.track:  # one W&B run per seed, grouped by run name: seeds are never averaged silently
        import wandb

        for s in seeds:
            config, name = {**asdict(args), "lane_seed": s}, f"{run_name}__seed{s}"
            wandb_runs.append(wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=name,
                                         group=run_name, config=config, reinit="create_new"))  # fmt: skip
    rows = []
    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    writer = csv.DictWriter(metrics_file, fieldnames=("global_step", "seed", *METRICS, "sps", "wall_time"))
    writer.writeheader()

    def log(global_step: int, metrics: dict, sps: float, wall_time: float):
        for i, s in enumerate(seeds):
            row = {"global_step": global_step, "seed": s, **{k: float(metrics[k][i]) for k in metrics}}
            row = {**{k: "" for k in METRICS}, **row, "sps": round(sps, 1), "wall_time": round(wall_time, 2)}
            row = {k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
            writer.writerow(row)
            rows.append(row)
            if wandb_runs:
                wandb_runs[i].log({k: v for k, v in row.items() if v != ""}, step=global_step)
        metrics_file.flush()

    if args.eval_only:
        global_step = int(ckpt["global_step"])
        returns, lengths = evaluate(env, eval_act, ckpt["actor"], seeds, global_step)
        log(global_step, {"episodic_return": returns, "episode_length": lengths}, 0.0, time.time() - script_start)
        final = best = returns
        sps, total_timesteps = 0.0, global_step
        print(f"eval-only {args.checkpoint} at global_step {global_step}: episodic_return per seed {returns.tolist()}")
    else:
        from tqdm import tqdm

        buffer_gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rs_shape["buffer"])) / 1e9
        print(f"{env_id}: {env.num_agents} agents {env.agents}, obs {env.obs_dims}, state {env.state_dim}, actions "
              f"{env.act_dims}, {E} envs x {args.num_seeds} seed(s) on {env.base.device}, JAX on "
              f"{jax.default_backend()}; replay buffer {buffer_gb:.2f} GB; compiling...", flush=True)  # fmt: skip
        obs, state = first["obs"], first["state"]
        rs = jax.jit(jax.vmap(init))(seeds_arr)
        act = jax.jit(jax.vmap(act, in_axes=(0, 0, 0, None)))
        learn = jax.jit(jax.vmap(learn, in_axes=(0, 0, None)), donate_argnums=0)
        start, final, best, best_mean = time.time(), None, None, -np.inf
        times = dict.fromkeys(("train", "env", "eval"), 0.0)  # seconds: training (Isaac Sim steps included), eval
        for chunk in range(num_chunks):
            try:
                bar = tqdm(total=steps_per_chunk, unit="step", desc=f"chunk {chunk + 1}/{num_chunks}", leave=False)
                chunk_start, env_time, updates = time.time(), 0.0, []
                zeros = jnp.zeros((args.num_seeds, E))
                ep = {"ret": zeros, "len": zeros, **dict.fromkeys(("sum_ret", "sum_len", "count"), zeros[:, 0])}
                for iteration in range(chunk * iters_per_chunk, (chunk + 1) * iters_per_chunk):
                    key, action = act(rs["learner"]["actor"], rs["key"], obs, np.int32(iteration))
                    env_start = time.time()
                    out = env.step(action)  # (Isaac Sim runs asynchronously on the GPU: env_time is a lower bound)
                    env_time += time.time() - env_start
                    transitions = {"obs": obs, "state": state, "action": action, "next_obs": out["obs"]}
                    transitions |= {k: out[k] for k in ("reward", "terminal", "truncated")}
                    transitions["next_state"] = out["state"]
                    ep = track_episodes(ep, out["reward"], out["done"])
                    obs, state = out["obs"], out["state"]
                    rs, metrics, updated = learn(rs | {"key": key}, transitions, np.int32(iteration))
                    updates.append((metrics, updated))
                    bar.update(E)
                jax.block_until_ready(rs["learner"])  # the last update, dispatched asynchronously, counts as training
                train_time = time.time() - chunk_start
                global_step = (chunk + 1) * steps_per_chunk
                returns, lengths = evaluate(env, eval_act, rs["learner"]["actor"], seeds, global_step)
                first = env.reset()  # training resumes from fresh episodes after the evaluation
                obs, state = first["obs"], first["state"]
                bar.close()
            except KeyboardInterrupt:  # the run folder stays without summary.json: incomplete, and says so
                print(f"interrupted; {run_dir} is incomplete (no summary.json)", file=sys.stderr)
                return 130
            times["train"], times["env"] = times["train"] + train_time, times["env"] + env_time
            times["eval"] += time.time() - chunk_start - train_time
            metrics, updated = (np.stack(x, axis=1) for x in zip(*jax.device_get(updates), strict=True))
            count = updated.sum(axis=1, keepdims=True)  # (seed, 1): iterations of this chunk with updates
            mean = np.where(count > 0, (metrics * updated[..., None]).sum(axis=1) / np.maximum(count, 1), np.nan)
            metrics = dict(zip(UPDATE_METRICS, mean.T, strict=True))
            ep = jax.device_get(ep)
            train_return = np.where(ep["count"] > 0, ep["sum_ret"] / np.maximum(ep["count"], 1), np.nan)
            metrics |= {"episodic_return": returns, "episode_length": lengths, "train_return": train_return}
            metrics["env_share"] = np.full(args.num_seeds, env_time / train_time)
            elapsed = time.time() - start
            sps = global_step / elapsed  # env steps per second per seed (CleanRL's SPS); x num_seeds for the machine
            log(global_step, metrics, sps, elapsed)
            if reason := divergence(metrics, rs["learner"]):  # metrics.csv keeps this chunk; no summary.json
                bar.close()
                print(f"error: diverged at env step {global_step}: {reason}; {run_dir} is incomplete", file=sys.stderr)
                return 1
            final = returns
            if final.mean() > best_mean:  # best = highest mean over seeds (Table 1's statistic)
                best, best_mean = final, final.mean()
            print(f"step {global_step:,}: eval return {final.mean():.2f}, {sps:.0f} env steps/s per seed", flush=True)
        total_timesteps = global_step  # --total-timesteps rounded down to whole chunks
        if args.save_model:
            ckpt = {"actor": rs["learner"]["actor"], "global_step": global_step, "config": json.dumps(asdict(args))}
            with open(os.path.join(run_dir, "model.flax"), "wb") as f:
                f.write(flax.serialization.to_bytes(ckpt))
    metrics_file.close()
    plot_curve(rows, os.path.join(run_dir, "learning_curve.png"), f"DDPL on {env_id}")
    summary = {
        "script": os.path.basename(__file__),
        "env_id": env_id,
        "total_timesteps": total_timesteps,
        "num_seeds": args.num_seeds,
        "final_eval_return": stats(final),
        "best_eval_return": stats(best),
        "wall_time_s": round(time.time() - script_start, 2),
        "sps": round(sps, 1),
        "eval_only": args.eval_only,
        "jax_backend": jax.default_backend(),
    }
    if not args.eval_only:  # where the time went: env steps/s of training alone and the Isaac Sim share of it
        summary |= {f"{k}_time_s": round(v, 2) for k, v in times.items()}
        summary["train_sps"] = round(total_timesteps / times["train"], 1)
    # summary.json last: its presence marks a complete run folder
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for run in wandb_runs:
        run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
        run.finish()
    print(f"final eval return {summary['final_eval_return']['mean']:.2f} +- {summary['final_eval_return']['std']:.2f}")
    print(f"wrote {run_dir}")
    return 0


def main(args: Args) -> int:
    """Launch Isaac Sim headless, build the task with gym.make, then train(). Exits 2 without Isaac Sim."""
    if error := validate(args):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if missing := missing_isaac():
        print(f"error: IsaacLab is not installed here (missing: {missing}); {INSTALL_HINT}", file=sys.stderr)
        return 2
    from isaaclab.app import AppLauncher  # Isaac Sim must be running before any other isaaclab module is imported

    app = AppLauncher(headless=True, device=args.device).app
    try:
        import gymnasium as gym
        import isaaclab_tasks  # noqa: F401  (registers the Isaac-* task ids with gymnasium)
        from isaaclab_tasks.utils import parse_env_cfg

        cfg = parse_env_cfg(args.task, device=args.device, num_envs=args.num_seeds * args.num_envs)
        cfg.seed = args.seed
        env = gym.make(args.task, cfg=cfg)
        try:
            return train(args, env)
        finally:
            env.close()
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
