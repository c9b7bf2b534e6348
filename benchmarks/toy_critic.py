"""What the critics of the toy game learn: Algorithm 2 on one agent, per class, with the critic read at every chunk.

Trains `ddpl_gaussian_ablation.py --env toy` with one agent for both policy classes (its toy defaults, 10 seeds
vmapped; flags after the script name go to the ablation's parser) and prints after every chunk, per seed: the
learned min(Q1, Q2) at s0 for the bump action a = 0 and for a* = 0.8, the best Q at goal and where it sits, and the
policy's mass in s0 within delta of a* (from 512 probe samples). With the goal policy learned, Q(s0, a*) should
approach p gamma V(goal) = 0.5 x 0.9 x 10 = 4.5 against the bump's 1 (docs/ddpl_gaussian_ablation.md, "The toy
game").

    python benchmarks/toy_critic.py                            # 20k env steps per seed
    python benchmarks/toy_critic.py --total-timesteps 60000
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpl_gaussian_ablation as abl  # noqa: E402


def main() -> int:
    sys.argv = [sys.argv[0], "--env", "toy", *sys.argv[1:]]
    args = abl.parse_cli()
    if error := abl.validate(args):
        print(f"error: {error}", file=sys.stderr)
        return 2
    env, seeds = abl.ToyArrays(1), jnp.arange(args.num_seeds) + args.seed
    grid = jnp.linspace(-1.0, 1.0, 41)  # a = 0 at index 20, a* = 0.8 at index 36
    critic_net = abl.TwinCritic(hidden=args.hidden_size)

    def q_on_grid(critic, pos):  # agent 0's min(Q1, Q2)(s, a) on the grid, with its copy at s0 (0) or goal (1)
        state = jnp.broadcast_to(jax.nn.one_hot(pos, 3), (grid.shape[0], 3))
        return jnp.minimum(*critic_net.apply(jax.tree.map(lambda x: x[0], critic), state, grid[:, None]))

    q_on_grid = jax.jit(jax.vmap(q_on_grid, (0, None)))
    for policy in ("diffusion", "gaussian"):
        train = abl.make_train(args, env, policy)
        rs = jax.jit(jax.vmap(train.init))(seeds)
        train_chunk, probe = jax.jit(jax.vmap(train.chunk, in_axes=(0, None))), jax.jit(jax.vmap(train.probe))
        print(f"\n{policy}, {args.num_seeds} seeds (one value per seed)")
        for chunk in range(train.num_chunks):
            rs, _ = train_chunk(rs, jnp.int32(chunk))
            q_s0, q_goal = (np.asarray(q_on_grid(rs["learner"]["critic"], pos)) for pos in (0, 1))
            actions = np.asarray(probe(rs["learner"]["actor"], seeds))[:, 0, :, 0]  # (seed, sample) at s0
            window = (np.abs(actions - abl.TOY["a_star"]) <= abl.TOY["delta"]).mean(axis=1)
            best_goal_action = np.round(np.asarray(grid)[q_goal.argmax(axis=1)], 2)
            print(f"  {(chunk + 1) * train.steps_per_chunk:>6} steps: Q(s0, 0) {np.round(q_s0[:, 20], 2)}  "
                  f"Q(s0, a*) {np.round(q_s0[:, 36], 2)}  max_a Q(goal, a) {np.round(q_goal.max(axis=1), 2)} "
                  f"at a = {best_goal_action}  mass near a* {np.round(window, 3)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
