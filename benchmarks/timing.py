"""Time one training update and one action selection (paper Table 2): DDPL vs DACER-, QVPO-style and Gaussian updates.

Every method gets the same networks (Table 3: 3x256 mish), batch (256), K (20), agents and critic step (twin
averaged-Q critics on the scaled SMAX critic state, one Adam step, Polyak target), taken from the scripts themselves;
only the policy update and the TD target's next action differ:

- ddpl:      ISSM (eq. 2) on B_p of the B states (--issm-batch-size, default B / M as in the scripts), M proposals
             per state from pi^t, weighted DSM; TD next action from the sampler
             (ddpl_gaussian_ablation.make_policy("diffusion"), the same code as ddpl_smax.py's update)
- ddpl-full-batch: the same with B_p = B, i.e. M proposals for every state of the batch (the scripts before B_p)
- ddpl-mix:  ddpl with --proposal-mix 0.1 (a tenth of the proposals uniform on the box; docs/algorithm.md sec. 4)
- dacer:     policy loss -Qbar(s, a_theta) back-propagated through the K-step sampler (Wang et al. 2024, without
             its entropy tuning, which costs one extra scalar)
- qvpo:      Q-weighted DSM (Ding et al. 2024, the official defaults): 64 samples per state, the best one weighted
             by its advantage over their mean, plus 10 uniform actions per state weighted by 0.02 (entropy term);
             TD next action the best of 4 target samples
- gaussian:  the reverse-KL Gaussian of ddpl_gaussian_ablation.py (make_policy("gaussian")), its policy step on the
             same B_p states
- ddpl-unsplit (the scripts before the split first layer): the sampler runs the whole score network, the
             observation's share of the first layer included, at every denoising step; the same function up to
             float rounding (checked at start)

All methods are decentralised (one update per agent, vmapped over agents), as DDPL is; the paper ran DACER and QVPO
centrally on the joint observation and action. The rounds interleave the methods, so machine noise hits all alike;
the figures are medians over rounds. GFLOP/s counts the matmuls of the DDPL and DACER updates (analytically, the
sampler's scan included) against a measured 256-wide fp32 matmul.

    python benchmarks/timing.py                  # 3s_vs_5z, M = 4, on the default JAX device
    python benchmarks/timing.py --rounds 5       # a quick look
The last line is `ratios: DDPL/DACER=<x> DDPL/Gaussian=<y>` (medians of this run), for tools to read.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ddpl_gaussian_ablation as ablation  # noqa: E402
from ddpl_smax import SMAXArrays, TwinCritic, dsm_loss, issm_weights, sample_actions, valid_maps  # noqa: E402

METHODS = ("ddpl", "ddpl-full-batch", "ddpl-mix", "ddpl-unsplit", "dacer", "qvpo", "gaussian")
QVPO_TRAIN_SAMPLES, QVPO_TARGET_SAMPLES, QVPO_BEHAVIOUR_SAMPLES = 64, 4, 4  # QVPO's official defaults
QVPO_ENTROPY_SAMPLES, QVPO_ENTROPY_WEIGHT = 10, 0.02


def sample_unsplit(apply_fn, params, obs, key, sched, action_dim):
    """ddpl-unsplit: the sampler as it was before the split first layer, the whole network (observation included)
    at every step; the same keys and function as sample_actions, up to float rounding (checked at start)."""
    K = sched["betas"].shape[0]
    keys = jax.random.split(key, K + 1)

    def step(x, inp):
        k, step_key = inp
        i = k - 1
        eps = apply_fn(params, x, jnp.full(x.shape[:-1], k), obs)
        x0 = jnp.clip((x - jnp.sqrt(1.0 - sched["abar"][i]) * eps) / jnp.sqrt(sched["abar"][i]), -1.0, 1.0)
        noise = jnp.where(k > 1, sched["sigma"][i], 0.0) * jax.random.normal(step_key, x.shape)
        return sched["c1"][i] * x0 + sched["c2"][i] * x + noise, None

    x_K = jax.random.normal(keys[0], obs.shape[:-1] + (action_dim,))
    x_0, _ = jax.lax.scan(step, x_K, (jnp.arange(K, 0, -1), keys[1:]))
    return jnp.clip(x_0, -1.0, 1.0)


def build(method: str, args, N: int, D: int, S: int, A: int):
    """(update, act, params) for one method: update(params, batch, key) -> params (one step of every agent),
    act(params, obs (N, D), state (S,), key) -> actions (N, A) for one env. params has the agents as leading axis."""
    M = args.num_action_samples
    cfg = ablation.Args(env="smax", num_action_samples=M, batch_size=args.batch_size, hidden_size=args.hidden_size)
    cfg = replace(cfg, num_diffusion_steps=args.num_diffusion_steps, proposal_mix=0.1 if method == "ddpl-mix" else 0.0)
    policy = "gaussian" if method == "gaussian" else "diffusion"
    init_actor, sample, actor_loss = ablation.make_policy(cfg, policy, A)
    critic_net = TwinCritic(hidden=cfg.hidden_size)
    sched = ablation.make_noise_schedule(cfg.noise_schedule, cfg.num_diffusion_steps)
    score_apply = ablation.ScoreNet(action_dim=A, hidden=cfg.hidden_size).apply
    tx = optax.adam(optax.linear_schedule(cfg.learning_rate, cfg.learning_rate_end, 10_000))
    B = cfg.batch_size
    Bp = B if method == "ddpl-full-batch" else issm_rows(args)  # states of the policy step

    def init(key):
        k_actor, k_critic = jax.random.split(key)
        actor, critic = init_actor(k_actor, D), critic_net.init(k_critic, jnp.zeros((1, S)), jnp.zeros((1, A)))
        p = {"actor": actor, "critic": critic, "critic_target": critic}
        return p | {"actor_opt": tx.init(actor), "critic_opt": tx.init(critic)}

    def min_q(critic, state, action):  # state broadcast over any sample axes of action
        state = jnp.broadcast_to(state, action.shape[:-1] + state.shape[-1:])
        return jnp.minimum(*critic_net.apply(critic, state, action))

    def best_of(p, critic, obs, state, n, key):  # QVPO's action selection: the best of n samples by Qbar
        cands = sample(p["actor"], jnp.broadcast_to(obs[..., None, :], obs.shape[:-1] + (n, D)), key)
        best = jnp.argmax(min_q(critic, state[..., None, :], cands), axis=-1)
        return jnp.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]

    def policy_grads(p, critic, b, key, proposals=None):
        q_fn = lambda a: min_q(critic, b["state"][: a.shape[0], None], a)  # noqa: E731
        if method == "dacer":  # -Q(s, a_theta) through the whole reverse chain
            return jax.grad(lambda th: -q_fn(sample(th, b["obs"][:, None], key)).mean())(p["actor"])
        if method == "qvpo":
            k_s, k_u, k_dsm = jax.random.split(key, 3)
            cands = sample(p["actor"], jnp.broadcast_to(b["obs"][:, None], (B, QVPO_TRAIN_SAMPLES, D)), k_s)
            q = q_fn(cands)
            best = jnp.argmax(q, axis=-1)
            chosen = jnp.take_along_axis(cands, best[:, None, None], axis=1)  # (B, 1, A)
            w = jnp.maximum(jnp.take_along_axis(q, best[:, None], axis=1) - q.mean(axis=1, keepdims=True), 0.0)
            uniform = jax.random.uniform(k_u, (B, QVPO_ENTROPY_SAMPLES, A), minval=-1.0, maxval=1.0)
            x0 = jnp.concatenate([chosen, uniform], axis=1)
            weights = jnp.concatenate([w, jnp.full((B, QVPO_ENTROPY_SAMPLES), QVPO_ENTROPY_WEIGHT)], axis=1)
            return jax.grad(dsm_loss, argnums=1)(score_apply, p["actor"], b["obs"], x0, k_dsm, sched, weights)
        if method == "ddpl-unsplit":  # proposals came from the old sampler
            weights = issm_weights(q_fn(proposals), cfg.eta)  # the default --weight-rule state
            return jax.grad(dsm_loss, argnums=1)(score_apply, p["actor"], b["obs"][:Bp], proposals, key, sched, weights)
        temp = {"log_eta": jnp.zeros(()), "q_scale": jnp.zeros(())}  # issm_temperature's state
        loss = lambda th: actor_loss(th, p["actor"], b["obs"][:Bp], jnp.ones(Bp), q_fn, temp, key)[0]  # noqa: E731
        return jax.grad(loss)(p["actor"])

    def update_agent(p, b, key):
        k_next, k_pol = jax.random.split(key)
        proposals = None
        if method == "qvpo":
            next_action = best_of(p, p["critic_target"], b["next_obs"], b["next_state"], QVPO_TARGET_SAMPLES, k_next)
        elif method == "ddpl-unsplit":
            next_action = sample_unsplit(score_apply, p["actor"], b["next_obs"], k_next, sched, A)
            k_next, k_pol = jax.random.split(k_pol)
            obs = jnp.broadcast_to(b["obs"][:Bp, None], (Bp, M, D))
            proposals = sample_unsplit(score_apply, p["actor"], obs, k_next, sched, A)
        else:
            next_action = sample(p["actor"], b["next_obs"], k_next)
        y = b["reward"] + cfg.gamma * (1.0 - b["terminal"]) * min_q(p["critic_target"], b["next_state"], next_action)

        def critic_loss(params):
            q1, q2 = critic_net.apply(params, b["state"], b["action"])
            return jnp.mean((q1 - y) ** 2) + jnp.mean((q2 - y) ** 2)

        updates, critic_opt = tx.update(jax.grad(critic_loss)(p["critic"]), p["critic_opt"])
        critic = optax.apply_updates(p["critic"], updates)
        updates, actor_opt = tx.update(policy_grads(p, critic, b, k_pol, proposals), p["actor_opt"])
        actor = optax.apply_updates(p["actor"], updates)
        critic_target = optax.incremental_update(critic, p["critic_target"], cfg.tau)
        return {"actor": actor, "actor_opt": actor_opt, "critic": critic, "critic_target": critic_target} | {
            "critic_opt": critic_opt
        }

    def update(params, batch, key):
        return jax.vmap(update_agent)(params, batch, jax.random.split(key, N))

    def act(params, obs, state, key):
        keys = jax.random.split(key, N)
        if method == "qvpo":
            behave = lambda p, o, k: best_of(p, p["critic"], o, state, QVPO_BEHAVIOUR_SAMPLES, k)  # noqa: E731
            return jax.vmap(behave)(params, obs, keys)
        if method == "ddpl-unsplit":
            return jax.vmap(lambda p, o, k: sample_unsplit(score_apply, p["actor"], o, k, sched, A))(params, obs, keys)
        return jax.vmap(lambda p, o, k: sample(p["actor"], o, k))(params, obs, keys)

    params = jax.vmap(init)(jax.random.split(jax.random.PRNGKey(0), N))
    return jax.jit(update), jax.jit(act), params


def issm_rows(args) -> int:
    """B_p as the scripts resolve --issm-batch-size (0: B // M)."""
    return args.issm_batch_size or max(1, args.batch_size // args.num_action_samples)


def update_flops(method: str, N, D, S, A, B, K, M, Bp, H=256) -> float:
    """Matmul FLOPs of one update of all agents, ddpl (ISSM on Bp states) or dacer (2 per multiply-add; a backward
    pass = 2 forwards)."""
    score = 2 * ((A + 16 + D) * H + 2 * H * H + H * A)  # per row: input layer, 2 hidden layers, output
    chain = 2 * D * H + K * (score - 2 * D * H)  # per row of the sampler: the observation's share once (split layer)
    critic = 2 * 2 * ((S + A) * H + 2 * H * H + H)  # twin heads
    per_agent = B * chain + B * critic  # TD target: sampler at o', target critics
    per_agent += 3 * B * critic  # critic forward and backward
    if method.startswith("ddpl"):
        per_agent += Bp * M * chain + Bp * M * critic  # ISSM proposals from pi^t and their Qbar
        per_agent += 3 * Bp * M * score  # weighted DSM forward and backward
    else:  # dacer: the sampler forward, then Qbar and everything back through the chain
        per_agent += 3 * B * chain + 3 * B * critic
    return N * per_agent


def time_calls(fns: dict, rounds: int) -> dict:
    """Median wall time in ms of each zero-argument function, rounds interleaved across functions."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", default="3s_vs_5z", help="SMAX map that sets agents and dims (default 3s_vs_5z)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=256, help="transitions per update (Table 3: 256)")
    parser.add_argument("--num-action-samples", type=int, default=4, help="M of DDPL (the scripts' default: 4)")
    parser.add_argument("--issm-batch-size", type=int, default=0, help="B_p of DDPL (0, the scripts' default: B / M)")
    parser.add_argument("--hidden-size", type=int, default=256, help="width of all networks (Table 3: 256)")
    parser.add_argument("--num-diffusion-steps", type=int, default=20, help="K (Table 3: 20)")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per method, interleaved")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS] or ([] if args.map in valid_maps() else [args.map])
    small = min(args.rounds, args.hidden_size, args.num_diffusion_steps, args.issm_batch_size + 1) < 1
    if bad or small or not {"ddpl", "dacer", "gaussian"} <= set(methods):
        print(f"error: --methods must include ddpl,dacer,gaussian from {', '.join(METHODS)}; --map one of "
              f"{', '.join(valid_maps())}; --rounds, --hidden-size, --num-diffusion-steps >= 1; --issm-batch-size >= 0",
              file=sys.stderr)  # fmt: skip
        return 2

    env = SMAXArrays(args.map)
    N, D, S, A = env.num_agents, env.obs_dim, env.state_dim, env.act_dim
    B, K, M, H = args.batch_size, args.num_diffusion_steps, args.num_action_samples, args.hidden_size
    key = jax.random.PRNGKey(1)
    batch = {  # random data of the right shapes: the cost does not depend on the values
        "obs": jax.random.normal(key, (N, B, D)), "next_obs": jax.random.normal(key, (N, B, D)),
        "state": jax.random.normal(key, (N, B, S)), "next_state": jax.random.normal(key, (N, B, S)),
        "action": jax.random.uniform(key, (N, B, A), minval=-1.0), "reward": jnp.ones((N, B)),
        "terminal": jnp.zeros((N, B)),
    }  # fmt: skip
    obs, state = jax.random.normal(key, (N, D)), jax.random.normal(key, (S,))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU threads, "
          f"jax {jax.__version__}")  # fmt: skip
    Bp = min(issm_rows(args), B)
    print(f"{args.map}: N={N} agents, obs {D}, state {S}, action {A}; B={B}, K={K}, M={M}, B_p={Bp}")

    if "ddpl-unsplit" in methods:  # the old sampler must compute the scripts' function, up to float rounding
        _, _, params = build("ddpl", args, N, D, S, A)
        actor = jax.tree.map(lambda v: v[0], params["actor"])
        apply = ablation.ScoreNet(action_dim=A, hidden=H).apply
        sched = ablation.make_noise_schedule("cosine", K)
        o = jnp.broadcast_to(batch["obs"][0][:Bp, None], (Bp, M, D))
        ref = jax.jit(lambda p, o, k: sample_actions(apply, p, o, k, sched, A))(actor, o, key)
        old = jax.jit(lambda p, o, k: sample_unsplit(apply, p, o, k, sched, A))(actor, o, key)
        diff = float(jnp.abs(ref - old).max())
        print(f"ddpl-unsplit vs the scripts' sampler, same key: max abs difference {diff:.1e}")
    train, infer, compile_s = {}, {}, {}
    for m in methods:
        start = time.perf_counter()
        update, act, params = build(m, args, N, D, S, A)
        jax.block_until_ready(update(params, batch, key))
        jax.block_until_ready(act(params, obs, state, key))
        compile_s[m] = time.perf_counter() - start
        train[m] = lambda u=update, p=params: u(p, batch, key)
        infer[m] = lambda a=act, p=params: a(p, obs, state, key)
    time_calls(train, 2)  # warm caches
    train_ms, infer_ms = time_calls(train, args.rounds), time_calls(infer, args.rounds)

    x = jax.random.normal(key, (B * M * 4, 256))
    w = jax.random.normal(key, (256, 256))
    matmul = jax.jit(lambda x, w: x @ w)
    jax.block_until_ready(matmul(x, w))
    peak = 2 * x.shape[0] * 256 * 256 / (time_calls({"mm": lambda: matmul(x, w)}, 50)["mm"] * 1e-3) / 1e9

    print(f"\nmedians over {args.rounds} interleaved rounds (ms per call, all {N} agents)")
    print(f"{'method':>11} {'train ms':>9} {'x DDPL':>7} {'infer ms':>9} {'compile s':>9}")
    for m in methods:
        ratio = train_ms[m] / train_ms["ddpl"]
        print(f"{m:>11} {train_ms[m]:9.2f} {ratio:7.2f} {infer_ms[m]:9.3f} {compile_s[m]:9.1f}")
    for m in ("ddpl", "ddpl-full-batch", "dacer"):
        if m not in methods:
            continue
        flops = update_flops(m, N, D, S, A, B, K, M, B if m == "ddpl-full-batch" else Bp, H)
        achieved = flops / (train_ms[m] * 1e-3) / 1e9
        print(f"{m.upper()} update: {flops / 1e9:.2f} GFLOP of matmuls, {achieved:.0f} GFLOP/s, "
              f"{achieved / peak:.0%} of an fp32 matmul ({x.shape[0]}x256 @ 256x256): {peak:.0f} GFLOP/s")  # fmt: skip
    print(f"ratios: DDPL/DACER={train_ms['ddpl'] / train_ms['dacer']:.2f} "
          f"DDPL/Gaussian={train_ms['ddpl'] / train_ms['gaussian']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
