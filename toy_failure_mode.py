"""Toy failure mode of Gaussian policies in DecSPG (paper Sec. 3.2, Fig. 1, Fig. 2, Thm 3.1, Prop. 3.2).

Algorithm 1 (DecSPG) on the MDP of Sec. 3.2.1 and its N-agent game (Sec. 3.2.2) with three policy classes: exact
(pi^{t+1} ∝ pi^t exp(eta Qbar) on an action grid), gaussian (its reverse-KL projection onto Gaussians, Thm 3.1) and
diffusion (a DDPM fitted to the same target by ISSM, eq. 2: DDPL). Each class is one jitted vmap over (seed, agent).
Parameters, choices and results: docs/toy_failure_mode.md.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro


@dataclass
class Args:
    exp_name: str = "toy_failure_mode"  # the name of this experiment (part of the run folder's name)
    seed: int = 0  # master seed; seeds are vmapped, so one process runs all of them
    num_seeds: int = 20  # independent runs per (policy class, number of agents)
    policy_classes: tuple[Literal["exact", "gaussian", "diffusion"], ...] = ("exact", "gaussian", "diffusion")  # to run
    num_agents_list: tuple[int, ...] = (1, 2, 3, 4, 5)  # numbers of agents N (Sec. 3.2.2; N = 1: MDP of Sec. 3.2.1)
    epochs: int = 150  # epochs T of Algorithm 1
    batch_size: int = 50  # actions sampled per state and epoch (Algorithm 1's batch size): the env interaction
    eta: float = 0.5  # DecSPG learning rate eta of the energy-based target pi^t exp(eta Qbar)
    gamma: float = 0.9  # discount factor
    bump_reward: float = 1.0  # c0: height of the easy reward bump at a = 0 in s0
    bump_width: float = 0.1  # w0: width of the easy reward bump at a = 0 in s0
    a_star: float = 0.8  # action that can move s0 to goal
    delta: float = 0.1  # half-width of the window around a_star that can move s0 to goal
    p_goal: float = 0.5  # probability of moving to goal for an action within delta of a_star
    goal_reward: float = 1.0  # R_g: height of the per-step reward bump in the absorbing goal state
    goal_action: float = -0.5  # a_g: centre of the goal reward bump
    goal_width: float = 0.1  # w_g: width of the goal reward bump
    init_std: float = 0.5  # every class starts from N(0, init_std^2) in both states
    kernel_bandwidth: float = 0.03  # h of the kernel regression that estimates Qbar from all samples so far
    kernel_reg: float = 0.5  # lambda of the kernel regression: Qbar -> 0 where no sample fell
    grid_size: int = 401  # points of the action grid on [-1, 1] (exact class, Qbar estimate, densities)
    num_action_samples: int = 256  # M: samples per state and epoch from pi^t, the ISSM proposal and the return estimate
    num_diffusion_steps: int = 20  # K: denoising steps of the diffusion policy
    noise_schedule: Literal["linear", "cosine", "vp"] = "cosine"  # noise schedule of the diffusion policy
    diffusion_hidden: int = 64  # width of the toy's score network (3 mish layers; the benchmarks use 256)
    diffusion_updates: int = 12  # ISSM Adam steps per epoch (each with fresh diffusion times and noise)
    diffusion_lr: float = 2e-3  # Adam learning rate of the score network
    pretrain_steps: int = 1000  # DSM steps fitting the initial diffusion policy to N(0, init_std^2)
    gaussian_updates: int = 50  # reverse-KL Adam steps per epoch of the Gaussian projection
    gaussian_lr: float = 0.02  # Adam learning rate of the Gaussian's (mean, log std)
    figure_epochs: tuple[int, ...] = (20, 100, 130, 150)  # epochs whose policy densities are drawn (Figure 1 analogue)
    runs_dir: str = "runs"  # parent folder of the run folder


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


# ALGO LOGIC: Algorithm 1 on the toy MDP (docs/algorithm.md sec. 8). 0 = s0, 1 = goal; the sink is worth 0.
def adam_update(tx, loss, num_steps: int, state, q_grid, actions, key):
    """num_steps Adam steps on loss(params, key_i, old params, q_grid, actions), key_i from split(key, num_steps)."""

    def step(carry, k):
        params, opt = carry
        upd, opt = tx.update(jax.grad(loss)(params, k, state[0], q_grid, actions), opt)
        return (optax.apply_updates(params, upd), opt), None

    return jax.lax.scan(step, state, jax.random.split(key, num_steps))[0]


def make_run(args: Args, policy_class: str, pretrain_key):
    """run(key): one lane of Algorithm 1, an agent learning Qbar_i on its own copy of the MDP (Prop. 3.2's premise)."""
    G, M, B, T = args.grid_size, args.num_action_samples, args.batch_size, args.epochs
    grid = jnp.linspace(-1.0, 1.0, G)
    dx = grid[1] - grid[0]
    sched, net = make_noise_schedule(args.noise_schedule, args.num_diffusion_steps), ScoreNet(1, args.diffusion_hidden)
    obs = jnp.eye(2)  # one-hot state: the policy is conditioned on s0 / goal
    fig_idx = jnp.array(args.figure_epochs) - 1

    def bump(a, height, centre, width):  # the reward bumps and the regression kernel
        return height * jnp.exp(-((a - centre) ** 2) / (2 * width**2))

    r_s0 = partial(bump, height=args.bump_reward, centre=0.0, width=args.bump_width)
    r_goal = partial(bump, height=args.goal_reward, centre=args.goal_action, width=args.goal_width)

    def log_normal(a, mu, log_std):
        return -0.5 * ((a - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)

    # each class: init, sample (2, M) actions for [s0, goal], update toward pi^t exp(eta Qbar), density on the grid
    if policy_class == "exact":  # log pi^t on the grid
        init = jnp.broadcast_to(log_normal(grid, 0.0, jnp.log(args.init_std)), (2, G))
        init = init - jax.nn.logsumexp(init, axis=-1, keepdims=True)

        def sample(logp, key):  # inverse-CDF draw of a grid cell, then uniform within the cell
            k1, k2 = jax.random.split(key)
            cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
            u = jax.random.uniform(k1, (2, M)) * cdf[:, -1:]
            idx = jnp.minimum(jax.vmap(jnp.searchsorted)(cdf, u), G - 1)
            return jnp.clip(grid[idx] + (jax.random.uniform(k2, (2, M)) - 0.5) * dx, -1.0, 1.0)

        def update(logp, q_grid, actions, key):  # the exact DecSPG step
            logp = logp + args.eta * q_grid
            return logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True)

        def density(logp, actions):
            return jnp.exp(logp) / dx

    elif policy_class == "gaussian":  # (mu, log std) per state, and the Adam state
        tx = optax.adam(args.gaussian_lr)
        g0 = jnp.stack([jnp.zeros(2), jnp.full(2, jnp.log(args.init_std))], axis=-1)  # (state, [mu, log_std])
        init = (g0, tx.init(g0))

        def sample(state, key):
            return jnp.clip(state[0][:, :1] + jnp.exp(state[0][:, 1:]) * jax.random.normal(key, (2, M)), -1.0, 1.0)

        def loss(
            g, k, old, q_grid, actions
        ):  # reverse KL to pi^t exp(eta Qbar), reparameterised (docs/algorithm.md sec. 7)
            a = g[:, :1] + jnp.exp(g[:, 1:]) * jax.random.normal(k, (2, M))
            q = jax.vmap(jnp.interp, (0, None, 0))(jnp.clip(a, -1, 1), grid, q_grid)
            lp_new, lp_old = log_normal(a, g[:, :1], g[:, 1:]), log_normal(a, old[:, :1], old[:, 1:])
            return jnp.mean(lp_new - lp_old - args.eta * q)

        update = partial(adam_update, tx, loss, args.gaussian_updates)

        def density(state, actions):
            return jnp.exp(log_normal(grid[None, :], state[0][:, :1], state[0][:, 1:]))

    else:  # diffusion, DDPL's policy class: score-net parameters and the Adam state
        tx = optax.adam(args.diffusion_lr)
        key, k_init = jax.random.split(pretrain_key)
        params = net.init(k_init, jnp.zeros((2, 1)), jnp.ones(2, jnp.int32), obs)

        def pretrain_loss(params, k, *_):  # plain DSM (eq. 1) toward N(0, init_std^2) in both states, for all lanes
            k1, k2 = jax.random.split(k)
            x0 = jnp.clip(args.init_std * jax.random.normal(k1, (2, 512, 1)), -1.0, 1.0)
            return dsm_loss(net.apply, params, obs, x0, k2, sched)

        fit = jax.jit(partial(adam_update, tx, pretrain_loss, args.pretrain_steps))
        params = fit((params, tx.init(params)), None, None, key)[0]
        init = (params, tx.init(params))

        def sample(state, key):
            return sample_actions(net.apply, state[0], jnp.repeat(obs[:, None], M, axis=1), key, sched, 1)[..., 0]

        def loss(params, k, old, q_grid, actions):  # ISSM (eq. 2): DSM weighted toward pi^t exp(eta Qbar)
            weights = issm_weights(jax.vmap(jnp.interp, (0, None, 0))(actions, grid, q_grid), args.eta, 1.0)
            return dsm_loss(net.apply, params, obs, actions[..., None], k, sched, weights)

        update = partial(adam_update, tx, loss, args.diffusion_updates)

        def density(state, actions):  # kernel density estimate of the epoch's M samples (bandwidth 0.02)
            z = (grid[None, :, None] - actions[:, None, :]) / 0.02
            return jnp.mean(jnp.exp(-0.5 * z**2), axis=-1) / (0.02 * jnp.sqrt(2 * jnp.pi))

    def epoch(carry, t):
        pol, stats0, statsg, key = carry
        key, k_sample, k_env, k_upd = jax.random.split(key, 4)
        actions = sample(pol, k_sample)  # (2, M) i.i.d. from pi^t; the first B are the batch
        a0, ag = actions[0, :B], actions[1, :B]
        star = jnp.abs(actions[0] - args.a_star) <= args.delta  # in the window that can move s0 to goal
        hit = jax.random.uniform(k_env, (B,)) < args.p_goal * star[:B]
        k0, kg = (bump(grid[None, :], 1.0, a[:, None], args.kernel_bandwidth) for a in (a0, ag))  # (B, G) weights K_h
        stats0 = stats0 + jnp.stack([k0.sum(0), k0.T @ r_s0(a0), k0.T @ hit.astype(jnp.float32)])
        statsg = statsg + jnp.stack([kg.sum(0), kg.T @ r_goal(ag)])
        # Qbar by kernel regression over all samples so far (docs/algorithm.md sec. 8); goal absorbing, sink worth 0
        r_goal_hat = statsg[1] / (statsg[0] + args.kernel_reg)
        v_goal = jnp.mean(jnp.interp(actions[1], grid, r_goal_hat)) / (1.0 - args.gamma)
        q_s0 = (stats0[1] + args.gamma * v_goal * stats0[2]) / (stats0[0] + args.kernel_reg)
        q_grid = jnp.stack([q_s0, r_goal_hat + args.gamma * v_goal])
        # true expected return of pi^t from s0, estimated with its M samples (Figure 2)
        true_v_goal = jnp.mean(r_goal(actions[1])) / (1.0 - args.gamma)
        ret = jnp.mean(r_s0(actions[0]) + args.gamma * (args.p_goal * star) * true_v_goal)
        dens = density(pol, actions)[0]  # s0 density of pi^t (Figure 1)
        pol = update(pol, q_grid, actions, k_upd)
        return (pol, stats0, statsg, key), (ret, jnp.any(hit), dens)

    def run(key):
        key, k_final = jax.random.split(key)
        carry = (init, jnp.zeros((3, G)), jnp.zeros((2, G)), key)  # grid sums: s0 [K, K r, K 1{hit}], goal [K, K r]
        (pol, *_), (ret, hits, dens) = jax.lax.scan(epoch, carry, jnp.arange(T))  # ret[t]: return of pi^t
        final_mass = jnp.mean(jnp.abs(sample(pol, k_final)[0] - args.a_star) <= args.delta)  # final mass near a*
        return {"return": ret, "final_mass": final_mass, "ever_reached": jnp.any(hits), "density": dens[fig_idx]}

    return run


# TRY NOT TO MODIFY: running, summarising, plotting and the command line
def run_all(args: Args):
    """{class: {N: arrays (seeds, N, ...)}}: a seed runs one max(N)-agent game, whose first N agents are the N-team."""
    key, k_pre = jax.random.split(jax.random.PRNGKey(args.seed))  # k_pre: the diffusion class's shared pretraining
    max_n, results = max(args.num_agents_list), {}
    for policy_class in args.policy_classes:
        key, k_class = jax.random.split(key)
        start = time.time()
        run = jax.jit(jax.vmap(make_run(args, policy_class, k_pre)))
        out = jax.device_get(run(jax.random.split(k_class, args.num_seeds * max_n)))
        out = {k: v.reshape((args.num_seeds, max_n) + v.shape[1:]) for k, v in out.items()}
        results[policy_class] = {n: {k: v[:, :n] for k, v in out.items()} for n in args.num_agents_list}
        print(f"  {policy_class:>9}: {args.num_seeds} seeds x {max_n} agents in {time.time() - start:.1f} s")
    return results


def summarise(args: Args, results, wall_time):
    """summary.json's content: per class and N, success rate, final return and ever-reached rate over seeds."""
    success, final_return, ever = ({c: {} for c in results} for _ in range(3))
    for c, by_n in results.items():
        for n, r in by_n.items():
            team_return = r["return"][:, :, -1].mean(axis=1)  # shared return per agent-copy, final epoch
            success[c][str(n)] = float(np.all(r["final_mass"] > 0.5, axis=1).mean())  # the team: every agent solves
            final_return[c][str(n)] = {"mean": float(team_return.mean()), "std": float(team_return.std())}
            ever[c][str(n)] = float(np.all(r["ever_reached"], axis=1).mean())
    summary = {"script": "toy_failure_mode.py", "success_rate": success, "final_return": final_return}
    summary |= {"ever_reached_rate": ever, "num_seeds": args.num_seeds, "epochs": args.epochs}
    return summary | {"wall_time_s": round(wall_time, 2)}


def plot(args: Args, results, summary, run_dir: Path):
    """fig1_policy_density.png, fig2_return.png (Fig. 1 and 2 analogues) and success_vs_agents.png (Prop. 3.2)."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    colors = {"exact": "tab:green", "gaussian": "tab:red", "diffusion": "tab:blue"}
    ns, epochs = sorted(args.num_agents_list), np.arange(1, args.epochs + 1)

    def panels(n, width, height):
        fig = Figure(figsize=(width * n, height), layout="tight")
        return fig, fig.subplots(1, n, sharey=True, squeeze=False)[0]

    def save(fig, ax, ylabel, name):
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.savefig(run_dir / name, dpi=100)

    fig, axes = panels(len(args.figure_epochs), 4, 3)  # Figure 1: s0 density of seed 0, agent 0
    for j, (ax, e) in enumerate(zip(axes, args.figure_epochs, strict=True)):
        for c, by_n in results.items():
            ax.plot(np.linspace(-1, 1, args.grid_size), by_n[ns[0]]["density"][0, 0, j], color=colors[c], label=c)
        ax.axvspan(args.a_star - args.delta, args.a_star + args.delta, color="gold", alpha=0.3)
        ax.set(title=f"epoch {e}", xlabel="action in s0")
    save(fig, axes[0], "density (seed 0)", "fig1_policy_density.png")
    fig, axes = panels(len({ns[0], ns[-1]}), 5, 3.5)  # Figure 2: return, smallest and largest N, mean and std
    for ax, n in zip(axes, sorted({ns[0], ns[-1]}), strict=True):
        for c, by_n in results.items():
            ret = by_n[n]["return"].mean(axis=1)  # (seeds, T) team return per agent-copy
            m, s = ret.mean(0), ret.std(0)
            ax.plot(epochs, m, color=colors[c], label=c)
            ax.fill_between(epochs, m - s, m + s, color=colors[c], alpha=0.2)
        ax.set(title=f"N = {n}", xlabel="epoch")
    save(fig, axes[0], "average return", "fig2_return.png")
    fig, (ax,) = panels(1, 5, 3.5)  # Prop. 3.2: success vs N, and q^N from the Gaussian's rate at N = 1
    for c in results:
        ax.plot(ns, [summary["success_rate"][c][str(n)] for n in ns], "o-", color=colors[c], label=c)
    if "gaussian" in results and 1 in ns:
        q = summary["success_rate"]["gaussian"]["1"]
        ax.plot(ns, [q**n for n in ns], "k--", label="gaussian q^N (Prop. 3.2)")
    ax.set(xlabel="number of agents N", ylim=(-0.05, 1.05))
    save(fig, ax, f"success rate ({args.num_seeds} seeds)", "success_vs_agents.png")


def validate(args: Args) -> str | None:
    """A one-line description of the first invalid flag tyro cannot check, or None. Runs before anything is written."""
    if not args.policy_classes or not args.num_agents_list or min(args.num_agents_list) < 1:
        got = f"{list(args.policy_classes)} and {list(args.num_agents_list)}"
        return f"need one or more --policy-classes, and --num-agents-list values N >= 1, got {got}"
    for name in ("epochs", "num_seeds", "batch_size", "num_action_samples", "num_diffusion_steps", "grid_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}"
    if args.batch_size > args.num_action_samples:
        return f"--batch-size ({args.batch_size}) must be <= --num-action-samples ({args.num_action_samples})"
    if not 0 <= args.gamma < 1 or not 0 <= args.p_goal <= 1:
        return f"--gamma must be in [0, 1) and --p-goal in [0, 1], got {args.gamma} and {args.p_goal}"
    if min(args.init_std, args.kernel_bandwidth, args.bump_width, args.goal_width) <= 0:
        return "--init-std, --kernel-bandwidth, --bump-width and --goal-width must be > 0"
    if bad := [e for e in args.figure_epochs if not 1 <= e <= args.epochs]:
        return f"--figure-epochs: {bad} outside 1..{args.epochs}"
    return None


def main(args: Args) -> int:
    if error := validate(args):
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(args.runs_dir, f"toy__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(args), indent=2))
    print(f"running {len(args.policy_classes)} classes x N in {list(args.num_agents_list)} x {args.num_seeds} seeds")
    start = time.time()
    results = run_all(args)
    summary = summarise(args, results, time.time() - start)
    plot(args, results, summary, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # last: it marks a complete run folder
    print(f"{'class':>10} " + " ".join(f"N={n:<5}" for n in args.num_agents_list) + "  (success rate)")
    for c, rates in summary["success_rate"].items():
        print(f"{c:>10} " + " ".join(f"{rates[str(n)]:<7.2f}" for n in args.num_agents_list))
    print(f"wrote {run_dir} in {summary['wall_time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
