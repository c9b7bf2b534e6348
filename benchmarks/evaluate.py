"""Evaluate a saved DDPL policy without training (CleanRL's cleanrl_utils/evals pattern).

    python benchmarks/evaluate.py runs/MPE_simple_reference_v3__ddpl_mpe__0__1764000000
    python benchmarks/evaluate.py path/to/model.flax --num-eval-episodes 200 --json

RUN_DIR_OR_MODEL is a run folder written with --save-model, or its model.flax. The model file holds every seed's actor,
the env step it was saved at, the script that trained it and that script's flags. This tool imports that script,
rebuilds its environment and policy from those flags and runs the script's own evaluation, compiled the same way as in
training: with the run's --num-eval-episodes (the default) it reproduces the training run's last evaluation (the last
rows of metrics.csv) bit for bit on CPU. Prints one line per seed; --json prints one JSON object instead.
"""

import argparse
import importlib
import json
import os
import sys
from dataclasses import fields, replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_model(path: str) -> dict:
    """model.flax (flax.serialization's msgpack, no pickle) -> {"actor", "global_step", "script", "config"}."""
    import flax.serialization

    path = os.path.join(path, "model.flax") if os.path.isdir(path) else path
    with open(path, "rb") as f:
        model = flax.serialization.msgpack_restore(f.read())
    if not {"actor", "global_step", "script", "config"} <= set(model):
        raise ValueError(f"{path} is not a model.flax written by --save-model of a ddpl_*.py script")
    return model


def jax_native(env_fn, names=("episodic_return", "disc_return")):
    """ddpl_mpe.py, ddpl_smax.py: main's evaluate, jax.jit(jax.vmap(train.evaluate)), seeds placed as in main. names:
    train.evaluate's leading outputs, in order (the critic check's state and action that follow are not reported)."""

    def evaluate(mod, args, actor, global_step: int) -> dict:
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        train = mod.make_train(args, env_fn(mod, args))
        lanes = NamedSharding(Mesh(np.array(jax.local_devices()), ("seed",)), PartitionSpec("seed"))
        seed_ids = jax.device_put(jnp.arange(args.seed, args.seed + args.num_seeds, dtype=jnp.int32), lanes)
        out = jax.jit(jax.vmap(train.evaluate, (0, 0, None)))(jax.device_put(actor, lanes), seed_ids, global_step)
        return {name: np.asarray(x) for name, x in zip(names, out, strict=False)}

    return evaluate


def isaaclab(mod, args, actor, global_step: int) -> dict:
    """ddpl_isaaclab.py: its play(), main's evaluation (the first episode of every env) on Isaac Sim; exit 2 where
    Isaac Sim cannot run."""
    try:
        return mod.play(args, actor, global_step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def mamujoco(mod, args, actor, global_step: int) -> dict:
    """ddpl_mamujoco.py: main's evaluation, make_evaluate (MuJoCo envs in Python, the policy compiled ahead of time)."""
    env = mod.MaMuJoCo(args.task, 1, args.local_obs, max_episode_steps=args.max_episode_steps)
    evaluate = mod.make_evaluate(args, mod.make_train(args, env), list(range(args.seed, args.seed + args.num_seeds)))
    return dict(zip(("episodic_return", "episode_length", "disc_return"), evaluate(actor, global_step), strict=False))


EVALUATORS = {
    "ddpl_mpe.py": jax_native(lambda mod, args: mod.MPEArrays(args.env_id)),
    "ddpl_mamujoco.py": mamujoco,
    "ddpl_smax.py": jax_native(
        lambda mod, args: mod.SMAXArrays(args.map), ("episodic_return", "win_rate", "disc_return")
    ),
    "ddpl_isaaclab.py": isaaclab,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "model", metavar="RUN_DIR_OR_MODEL", help="a run folder written with --save-model, or its model.flax"
    )
    parser.add_argument("--num-eval-episodes", type=int, default=0, help="episodes per seed (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of one line per seed")
    opts = parser.parse_args()
    try:
        model = load_model(opts.model)
        script = model["script"]
        if script not in EVALUATORS:
            raise ValueError(f"cannot evaluate models of {script}; this tool knows {', '.join(EVALUATORS)}")
        mod = importlib.import_module(script.removesuffix(".py"))
        config, known = json.loads(model["config"]), {f.name for f in fields(mod.Args)}
        if unknown := set(config) - known:
            raise ValueError(f"{script} has no flag(s) {', '.join(sorted(unknown))}: the model is from another version")
        args = mod.Args(**config)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.num_eval_episodes < 0:
        print(f"error: --num-eval-episodes must be >= 1 (0: the run's), got {opts.num_eval_episodes}", file=sys.stderr)
        return 2
    if hasattr(args, "num_eval_episodes"):
        args = replace(args, num_eval_episodes=opts.num_eval_episodes or args.num_eval_episodes)
    elif opts.num_eval_episodes:  # ddpl_isaaclab.py: the first episode of each of its --num-envs envs per seed
        print(f"error: {script} evaluates one episode per env; --num-eval-episodes does not apply", file=sys.stderr)
        return 2
    step = int(model["global_step"])
    metrics = EVALUATORS[script](mod, args, model["actor"], step)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    if opts.json:
        print(
            json.dumps(
                {"script": script, "global_step": step, "seeds": seeds} | {k: v.tolist() for k, v in metrics.items()}
            )
        )
        return 0
    episodes = getattr(args, "num_eval_episodes", args.num_envs)  # ddpl_isaaclab.py: one in each env
    print(f"{script} at env step {step:,}, {episodes} episodes per seed, stochastic policy")
    for i, seed in enumerate(seeds):
        print(f"seed {seed}: " + ", ".join(f"{k} {v[i]:.6g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
