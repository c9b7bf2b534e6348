"""Toy failure mode of Gaussian policies in DecSPG (paper Sec. 3.2, Fig. 1, Fig. 2, Thm 3.1, Prop. 3.2).

Runs Algorithm 1 (decentralized softmax policy gradient) on the single-agent MDP of Sec. 3.2.1 and its
N-agent embedding of Sec. 3.2.2 with three policy classes:
  exact     the energy-based update pi^{t+1} ∝ pi^t exp(eta Qbar) on a fine action grid ("all policies"),
  gaussian  its reverse-KL projection onto Gaussians (Thm 3.1: the mean stays at 0, the variance shrinks),
  diffusion a DDPM fitted to the same target by importance-sampling score matching (ISSM, eq. 2): DDPL.
Every (policy class, N, seed, agent) is one vmapped lane of a single jitted program.
Parameters, choices and results: docs/toy_failure_mode.md.
"""

import contextlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

POLICY_CLASSES = ("exact", "gaussian", "diffusion")
NOISE_SCHEDULES = ("linear", "cosine", "vp")


@dataclass
class Args:
    exp_name: str = "toy_failure_mode"
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 0
    """master seed; seeds are vmapped, so one process runs all of them"""
    num_seeds: int = 20
    """independent runs per (policy class, number of agents)"""
    policy_classes: tuple[str, ...] = POLICY_CLASSES
    """which policy classes to run: any of exact, gaussian, diffusion"""
    num_agents_list: tuple[int, ...] = (1, 2, 3, 4, 5)
    """numbers of agents N of the game of Sec. 3.2.2 (N = 1 is the single-agent MDP of Sec. 3.2.1)"""
    epochs: int = 150
    """epochs T of Algorithm 1"""
    batch_size: int = 50
    """actions sampled per state and epoch (Algorithm 1's batch size): the env interaction"""
    eta: float = 0.5
    """DecSPG learning rate eta of the energy-based target pi^t exp(eta Qbar)"""
    gamma: float = 0.9
    """discount factor"""
    bump_reward: float = 1.0
    """c0: height of the easy reward bump at a = 0 in s0"""
    bump_width: float = 0.1
    """w0: width of the easy reward bump at a = 0 in s0"""
    a_star: float = 0.8
    """action that can move s0 to goal"""
    delta: float = 0.1
    """half-width of the window around a_star that can move s0 to goal"""
    p_goal: float = 0.5
    """probability of moving to goal for an action within delta of a_star"""
    goal_reward: float = 1.0
    """R_g: height of the per-step reward bump in the absorbing goal state"""
    goal_action: float = -0.5
    """a_g: centre of the goal reward bump"""
    goal_width: float = 0.1
    """w_g: width of the goal reward bump"""
    init_std: float = 0.5
    """every class starts from N(0, init_std^2) in both states"""
    kernel_bandwidth: float = 0.03
    """h of the kernel regression that estimates Qbar from all samples so far"""
    kernel_reg: float = 0.5
    """lambda of the kernel regression: Qbar -> 0 where no sample fell"""
    grid_size: int = 401
    """points of the action grid on [-1, 1] (exact class, Qbar estimate, densities)"""
    num_action_samples: int = 256
    """M: samples per state and epoch from pi^t, the ISSM proposal and the return estimate"""
    num_diffusion_steps: int = 20
    """K: denoising steps of the diffusion policy"""
    noise_schedule: str = "cosine"
    """noise schedule of the diffusion policy: linear, cosine or vp"""
    diffusion_hidden: int = 64
    """width of the toy's score network (3 mish layers; the benchmarks use 256)"""
    diffusion_updates: int = 12
    """ISSM Adam steps per epoch (each with fresh diffusion times and noise)"""
    diffusion_lr: float = 2e-3
    """Adam learning rate of the score network"""
    pretrain_steps: int = 1000
    """DSM steps that fit the initial diffusion policy to N(0, init_std^2) (shared by all lanes)"""
    gaussian_updates: int = 50
    """reverse-KL Adam steps per epoch of the Gaussian projection"""
    gaussian_lr: float = 0.02
    """Adam learning rate of the Gaussian's (mean, log std)"""
    figure_epochs: tuple[int, ...] = (20, 100, 130, 150)
    """epochs whose policy densities are drawn (Figure 1 analogue)"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""


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


def validate(args: Args) -> str | None:
    """Return a one-line description of the first invalid flag, or None."""
    bad = [c for c in args.policy_classes if c not in POLICY_CLASSES]
    if bad or not args.policy_classes:
        return f"--policy-classes: unknown {bad or '(empty)'}; choose from {', '.join(POLICY_CLASSES)}"
    if args.noise_schedule not in NOISE_SCHEDULES:
        return f"--noise-schedule: unknown {args.noise_schedule!r}; choose from {', '.join(NOISE_SCHEDULES)}"
    if not args.num_agents_list or min(args.num_agents_list) < 1:
        return f"--num-agents-list: every N must be >= 1, got {list(args.num_agents_list)}"
    for name in ("epochs", "num_seeds", "batch_size", "num_action_samples", "num_diffusion_steps", "grid_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}"
    if args.batch_size > args.num_action_samples:
        return f"--batch-size ({args.batch_size}) must be <= --num-action-samples ({args.num_action_samples})"
    if not 0 <= args.gamma < 1 or not 0 <= args.p_goal <= 1:
        return f"--gamma must be in [0, 1) and --p-goal in [0, 1], got {args.gamma} and {args.p_goal}"
    if min(args.init_std, args.kernel_bandwidth, args.bump_width, args.goal_width) <= 0:
        return "--init-std, --kernel-bandwidth, --bump-width and --goal-width must be > 0"
    bad_epochs = [e for e in args.figure_epochs if not 1 <= e <= args.epochs]
    if bad_epochs:
        return f"--figure-epochs: {bad_epochs} outside 1..{args.epochs}"
    return None


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


# ALGO LOGIC: the toy MDP (ALGORITHM.md sec. 8). States: 0 = s0, 1 = goal (sink has value 0, no policy).
def make_run(args: Args, policy_class: str, init_score_params):
    """One lane of Algorithm 1: one agent of one game, learning its own copy of the MDP.

    In the N-agent game of Sec. 3.2.2 the shared reward is the sum of the N copies' rewards and coordinate
    i depends on a_i alone, so Qbar_i(s, a_i) = Q_copy_i(s_i, a_i) + a term that does not depend on a_i.
    Like Prop. 3.2 we take Qbar_i accurate for the other agents' terms; the energy update ignores the
    constant, so each agent runs this function on its own copy with its own keys.
    """
    G, M, B, T = args.grid_size, args.num_action_samples, args.batch_size, args.epochs
    grid = jnp.linspace(-1.0, 1.0, G)
    dx = grid[1] - grid[0]
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    net = ScoreNet(action_dim=1, hidden=args.diffusion_hidden)
    obs = jnp.eye(2)  # one-hot state: the policy is conditioned on s0 / goal
    fig_idx = jnp.array(args.figure_epochs) - 1

    def r_s0(a):
        return args.bump_reward * jnp.exp(-(a**2) / (2 * args.bump_width**2))

    def r_goal(a):
        return args.goal_reward * jnp.exp(-((a - args.goal_action) ** 2) / (2 * args.goal_width**2))

    def kernel(a):  # (n,) samples -> (n, G) kernel weights K_h(g - a)
        return jnp.exp(-((grid[None, :] - a[:, None]) ** 2) / (2 * args.kernel_bandwidth**2))

    # --- policy classes: init, sample (2, M) actions for [s0, goal], update toward pi^t exp(eta Qbar) ---
    def log_normal(a, mu, log_std):
        return -0.5 * ((a - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)

    if policy_class == "exact":
        init = jnp.broadcast_to(log_normal(grid, 0.0, jnp.log(args.init_std)), (2, G))
        init = init - jax.nn.logsumexp(init, axis=-1, keepdims=True)

        def sample(logp, key):  # inverse-CDF draw of a grid cell, then uniform within the cell
            k1, k2 = jax.random.split(key)
            cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
            u = jax.random.uniform(k1, (2, M)) * cdf[:, -1:]
            idx = jnp.minimum(jax.vmap(jnp.searchsorted)(cdf, u), G - 1)
            return jnp.clip(grid[idx] + (jax.random.uniform(k2, (2, M)) - 0.5) * dx, -1.0, 1.0)

        def update(logp, q_grid, actions, key):
            logp = logp + args.eta * q_grid  # the exact DecSPG step on the grid
            return logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True)

        def density(logp, actions):
            return jnp.exp(logp) / dx

    elif policy_class == "gaussian":
        tx = optax.adam(args.gaussian_lr)
        g0 = jnp.stack([jnp.zeros(2), jnp.full(2, jnp.log(args.init_std))], axis=-1)  # (state, [mu, log_std])
        init = (g0, tx.init(g0))

        def sample(state, key):
            g = state[0]
            return jnp.clip(g[:, :1] + jnp.exp(g[:, 1:]) * jax.random.normal(key, (2, M)), -1.0, 1.0)

        def update(state, q_grid, actions, key):
            g_old, opt = state[0], state[1]

            def loss(g, k):  # reverse KL to pi^t exp(eta Qbar), by reparameterisation (ALGORITHM.md sec. 7)
                a = g[:, :1] + jnp.exp(g[:, 1:]) * jax.random.normal(k, (2, M))
                q = jax.vmap(jnp.interp, (0, None, 0))(jnp.clip(a, -1, 1), grid, q_grid)
                lp_new = log_normal(a, g[:, :1], g[:, 1:])
                lp_old = log_normal(a, g_old[:, :1], g_old[:, 1:])
                return jnp.mean(lp_new - lp_old - args.eta * q)

            def step(carry, k):
                g, opt = carry
                upd, opt = tx.update(jax.grad(loss)(g, k), opt)
                return (optax.apply_updates(g, upd), opt), None

            (g, opt), _ = jax.lax.scan(step, (g_old, opt), jax.random.split(key, args.gaussian_updates))
            return (g, opt)

        def density(state, actions):
            g = state[0]
            return jnp.exp(log_normal(grid[None, :], g[:, :1], g[:, 1:]))

    else:  # diffusion: DDPL's policy class, trained by ISSM
        tx = optax.adam(args.diffusion_lr)
        init = (init_score_params, tx.init(init_score_params))

        def sample(state, key):
            return sample_actions(net.apply, state[0], jnp.repeat(obs[:, None], M, axis=1), key, sched, 1)[..., 0]

        def update(state, q_grid, actions, key):
            params, opt = state
            q = jax.vmap(jnp.interp, (0, None, 0))(actions, grid, q_grid)  # Qbar at the proposal samples

            def step(carry, k):
                params, opt = carry
                weights = issm_weights(q, args.eta, 1.0)  # ISSM (eq. 2): DSM weighted toward pi^t exp(eta Qbar)
                grads = jax.grad(dsm_loss, argnums=1)(net.apply, params, obs, actions[..., None], k, sched, weights)
                upd, opt = tx.update(grads, opt)
                return (optax.apply_updates(params, upd), opt), None

            (params, opt), _ = jax.lax.scan(step, (params, opt), jax.random.split(key, args.diffusion_updates))
            return (params, opt)

        def density(state, actions):  # kernel density estimate of the epoch's M samples (bandwidth 0.02)
            z = (grid[None, :, None] - actions[:, None, :]) / 0.02
            return jnp.mean(jnp.exp(-0.5 * z**2), axis=-1) / (0.02 * jnp.sqrt(2 * jnp.pi))

    def run(key):
        # Kernel-regression sums on the grid over all samples so far: den = sum K, num_r = sum K r,
        # num_hit = sum K 1{s0 -> goal}; Qbar(s0) = (num_r + gamma V(goal) num_hit) / (den + lambda).
        stats0 = jnp.zeros((4, G))  # [den_s0, num_r_s0, num_hit_s0, unused]
        statsg = jnp.zeros((2, G))  # [den_goal, num_r_goal]

        def epoch(carry, t):
            pol, stats0, statsg, key = carry
            key, k_sample, k_env, k_upd = jax.random.split(key, 4)
            actions = sample(pol, k_sample)  # (2, M) i.i.d. from pi^t; the first B are the batch
            a0, ag = actions[0, :B], actions[1, :B]
            hit = jax.random.uniform(k_env, (B,)) < args.p_goal * (jnp.abs(a0 - args.a_star) <= args.delta)
            k0, kg = kernel(a0), kernel(ag)
            stats0 = stats0 + jnp.stack([k0.sum(0), k0.T @ r_s0(a0), k0.T @ hit.astype(jnp.float32), jnp.zeros(G)])
            statsg = statsg + jnp.stack([kg.sum(0), kg.T @ r_goal(ag)])
            # Qbar estimates on the grid (ALGORITHM.md sec. 8): goal is absorbing, sink is worth 0
            r_goal_hat = statsg[1] / (statsg[0] + args.kernel_reg)
            v_goal = jnp.mean(jnp.interp(actions[1], grid, r_goal_hat)) / (1.0 - args.gamma)
            q_s0 = (stats0[1] + args.gamma * v_goal * stats0[2]) / (stats0[0] + args.kernel_reg)
            q_goal = r_goal_hat + args.gamma * v_goal
            q_grid = jnp.stack([q_s0, q_goal])
            # true expected return of pi^t from s0, estimated with its M samples (Figure 2)
            true_v_goal = jnp.mean(r_goal(actions[1])) / (1.0 - args.gamma)
            p_hit = args.p_goal * (jnp.abs(actions[0] - args.a_star) <= args.delta)
            ret = jnp.mean(r_s0(actions[0]) + args.gamma * p_hit * true_v_goal)
            mass_star = jnp.mean(jnp.abs(actions[0] - args.a_star) <= args.delta)
            dens = density(pol, actions)[0]  # s0 density of pi^t (Figure 1)
            pol = update(pol, q_grid, actions, k_upd)
            return (pol, stats0, statsg, key), (ret, mass_star, jnp.any(hit), dens)

        key, k_final = jax.random.split(key)
        (pol, *_), (ret, mass, hits, dens) = jax.lax.scan(epoch, (init, stats0, statsg, key), jnp.arange(T))
        final_mass = jnp.mean(jnp.abs(sample(pol, k_final)[0] - args.a_star) <= args.delta)
        return {
            "return": ret,  # (T,) expected return of pi^t, t = 0..T-1
            "final_mass": final_mass,  # mass of the final policy within delta of a_star
            "ever_reached": jnp.any(hits),
            "mass_curve": mass,
            "density": dens[fig_idx],  # densities of pi^t at the figure epochs (after t updates)
        }

    return run


def pretrain_diffusion(args: Args, key):
    """Fit the initial diffusion policy to N(0, init_std^2) in both states by plain DSM (eq. 1)."""
    sched = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps)
    net = ScoreNet(action_dim=1, hidden=args.diffusion_hidden)
    obs = jnp.eye(2)
    key, k_init = jax.random.split(key)
    params = net.init(k_init, jnp.zeros((2, 1)), jnp.ones(2, jnp.int32), obs)
    tx = optax.adam(args.diffusion_lr)

    @jax.jit
    def fit(params, key):
        def step(carry, k):
            params, opt = carry
            k1, k2 = jax.random.split(k)
            x0 = jnp.clip(args.init_std * jax.random.normal(k1, (2, 512, 1)), -1.0, 1.0)
            grads = jax.grad(dsm_loss, argnums=1)(net.apply, params, obs, x0, k2, sched)
            upd, opt = tx.update(grads, opt)
            return (optax.apply_updates(params, upd), opt), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, args.pretrain_steps))
        return params

    return fit(params, key)


# TRY NOT TO MODIFY: running, summarising and plotting
def run_all(args: Args):
    """Run every requested class for all seeds; returns {class: {N: arrays of shape (seeds, N, ...)}}.

    Agents of the game learn independently (make_run's docstring), so the N-agent game of a seed is
    exactly its first N agents: each seed runs one game of max(N) agents, and every N reads its team
    from it (nested teams, the same seeds for every N).
    """
    key = jax.random.PRNGKey(args.seed)
    key, k_pre = jax.random.split(key)
    init_params = pretrain_diffusion(args, k_pre) if "diffusion" in args.policy_classes else None
    max_n = max(args.num_agents_list)
    results = {}
    for policy_class in args.policy_classes:
        key, k_class = jax.random.split(key)
        start = time.time()
        run = jax.jit(jax.vmap(make_run(args, policy_class, init_params)))
        out = jax.device_get(run(jax.random.split(k_class, args.num_seeds * max_n)))
        out = {k: v.reshape((args.num_seeds, max_n) + v.shape[1:]) for k, v in out.items()}
        results[policy_class] = {n: {k: v[:, :n] for k, v in out.items()} for n in args.num_agents_list}
        print(f"  {policy_class:>9}: {args.num_seeds} seeds x {max_n} agents in {time.time() - start:.1f} s")
    return results


def summarise(args: Args, results, wall_time):
    success, final_return, ever = {}, {}, {}
    for c, by_n in results.items():
        success[c], final_return[c], ever[c] = {}, {}, {}
        for n, r in by_n.items():
            solved = np.all(r["final_mass"] > 0.5, axis=1)  # the team solves when every agent does
            team_return = r["return"][:, :, -1].mean(axis=1)  # shared return per agent-copy, final epoch
            success[c][str(n)] = float(solved.mean())
            final_return[c][str(n)] = {"mean": float(team_return.mean()), "std": float(team_return.std())}
            ever[c][str(n)] = float(np.all(r["ever_reached"], axis=1).mean())
    return {
        "script": "toy_failure_mode.py",
        "success_rate": success,
        "final_return": final_return,
        "ever_reached_rate": ever,
        "num_seeds": args.num_seeds,
        "epochs": args.epochs,
        "wall_time_s": round(wall_time, 2),
    }


def plot(args: Args, results, summary, run_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"exact": "tab:green", "gaussian": "tab:red", "diffusion": "tab:blue"}
    grid = np.linspace(-1, 1, args.grid_size)
    n1 = min(args.num_agents_list)
    # Figure 1: s0 density of seed 0, agent 0 at the figure epochs
    fig, axes = plt.subplots(1, len(args.figure_epochs), figsize=(4 * len(args.figure_epochs), 3), sharey=True)
    for j, e in enumerate(np.atleast_1d(args.figure_epochs)):
        ax = np.atleast_1d(axes)[j]
        for c, by_n in results.items():
            ax.plot(grid, by_n[n1]["density"][0, 0, j], color=colors[c], label=c)
        ax.axvspan(args.a_star - args.delta, args.a_star + args.delta, color="gold", alpha=0.3)
        ax.set_title(f"epoch {e}")
        ax.set_xlabel("action in s0")
    np.atleast_1d(axes)[0].set_ylabel("density (seed 0)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "fig1_policy_density.png"), dpi=100)
    plt.close(fig)
    # Figure 2: average return vs epoch, smallest and largest N, mean and std band over seeds
    ns = sorted({min(args.num_agents_list), max(args.num_agents_list)})
    fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 3.5), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), ns, strict=True):
        for c, by_n in results.items():
            ret = by_n[n]["return"].mean(axis=1)  # (seeds, T) team return per agent-copy
            m, s = ret.mean(0), ret.std(0)
            ax.plot(np.arange(1, args.epochs + 1), m, color=colors[c], label=c)
            ax.fill_between(np.arange(1, args.epochs + 1), m - s, m + s, color=colors[c], alpha=0.2)
        ax.set_title(f"N = {n}")
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].set_ylabel("average return")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "fig2_return.png"), dpi=100)
    plt.close(fig)
    # Prop. 3.2: success vs N with the independence prediction q^N from the single-agent rate
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = sorted(args.num_agents_list)
    for c in results:
        ax.plot(ns, [summary["success_rate"][c][str(n)] for n in ns], "o-", color=colors[c], label=c)
    if "gaussian" in results and 1 in ns:
        q = summary["success_rate"]["gaussian"]["1"]
        ax.plot(ns, [q**n for n in ns], "k--", label="gaussian q^N (Prop. 3.2)")
    ax.set_xlabel("number of agents N")
    ax.set_ylabel(f"success rate ({args.num_seeds} seeds)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "success_vs_agents.png"), dpi=100)
    plt.close(fig)


def main(args: Args) -> int:
    error = validate(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_name = f"toy__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    print(f"running {len(args.policy_classes)} classes x N in {list(args.num_agents_list)} x {args.num_seeds} seeds")
    start = time.time()
    results = run_all(args)
    summary = summarise(args, results, time.time() - start)
    plot(args, results, summary, run_dir)
    # summary.json last: its presence marks a complete run folder
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{'class':>10} " + " ".join(f"N={n:<5}" for n in args.num_agents_list) + "  (success rate)")
    for c, rates in summary["success_rate"].items():
        print(f"{c:>10} " + " ".join(f"{rates[str(n)]:<7.2f}" for n in args.num_agents_list))
    print(f"wrote {run_dir} in {summary['wall_time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
