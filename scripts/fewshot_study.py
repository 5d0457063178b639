"""Few-shot Omniglot with ProtoNets: zero-shot, backprop and forward-gradient fine-tuning.

The few-shot study of Chen et al., "Stepping Forward on the Last Mile" (NeurIPS 2024),
on the Omniglot files in `$FGJAX_DATA_DIR/omniglot` (see its README): each backbone (ResNet-12,
ResNet-18, ViT-tiny, at widths that run on 2 CPU cores) is pretrained by backprop as a classifier of
the characters of the background alphabets minus the held-out ones (`--held_out`); episodes come
from the held-out alphabets (5-way 1-shot and 5-shot, 15 queries per class) and from Lake's 20
one-shot runs (20-way 1-shot, evaluation alphabets). On each episode every row starts from the
ProtoNet (prototype head, `fgjax.fewshot.prototype_head`) and fine-tunes on the support set:
backprop, jvp, SPSA, sign-m-SPSA; full or linear probe (or ViT prompts); float32 or fixed point
(w16a8, w8a8: integer weights, stochastic rounding). Reported: mean query accuracy over episodes
and pretraining seeds, ± the 95 % confidence interval over episodes (1.96 σ/√n, n = episodes x
seeds), and the spread (std) of the per-seed means.

Command (see docs/results/fewshot.md for the one that wrote the table and its runtime):
  FGJAX_DATA_DIR=../shared/data python scripts/fewshot_study.py --output_dir /tmp/fewshot

Writes `results.csv` (one line per row, setting and backbone), `episodes.csv` (every episode),
`table.md`, and with `--doc` the Markdown page (default docs/results/fewshot.md).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import pathlib
import platform
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from fgjax import data as fdata
from fgjax import fewshot, models, training

BACKBONES = {
  # Small widths: the study runs on 2 shared CPU cores. The paper's are 64-160-320-640 (ResNet-12),
  # 64-128-256-512 (ResNet-18) and ViT-Ti (192 wide, 12 deep) on 84x84 / 224x224 images.
  "resnet12": lambda num_classes, quant, prompts=0: models.ResNet12(
    widths=(16, 32, 64, 128), num_classes=num_classes, quant=quant
  ),
  "resnet18": lambda num_classes, quant, prompts=0: models.ResNet18(
    widths=(16, 32, 64, 128), num_classes=num_classes, quant=quant
  ),
  "vit_tiny": lambda num_classes, quant, prompts=0: models.ViTTiny(
    patch_size=7,
    dim=64,
    depth=4,
    num_heads=2,
    mlp_dim=128,
    num_prompts=prompts,
    num_classes=num_classes,
    quant=quant,
  ),
}

# (row name, method, precision, trainable, learning-rate key); the rates are in LEARNING_RATES.
ROWS = [
  ("ProtoNet (zero-shot)", "none", "float32", "full", None),
  ("backprop, full", "backprop", "float32", "full", "backprop"),
  ("backprop, linear probe", "backprop", "float32", "linear_probe", "backprop_probe"),
  ("jvp, full", "jvp", "float32", "full", "forward"),
  ("SPSA, full", "spsa", "float32", "full", "forward"),
  ("sign-m-SPSA, full", "sign_spsa", "float32", "full", "sign"),
  ("sign-m-SPSA, linear probe", "sign_spsa", "float32", "linear_probe", "sign_probe"),
  ("sign-m-SPSA, full, w16a8", "sign_spsa", "w16a8", "full", "sign"),
  ("sign-m-SPSA, linear probe, w16a8", "sign_spsa", "w16a8", "linear_probe", "sign_probe"),
  ("sign-m-SPSA, full, w8a8", "sign_spsa", "w8a8", "full", "sign"),
  ("sign-m-SPSA, linear probe, w8a8", "sign_spsa", "w8a8", "linear_probe", "sign_probe"),
  ("backprop, prompts (ViT)", "backprop", "float32", "prompts", "backprop_probe"),
  ("sign-m-SPSA, prompts (ViT)", "sign_spsa", "float32", "prompts", "sign_probe"),
]

SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "lake20w1s": (20, 1)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output_dir", default="/tmp/fewshot")
  parser.add_argument("--data_dir", default=None, help="folder with the zips (default: env)")
  parser.add_argument(
    "--pretrained_dir", default=None, help="cache of pretrained backbones (default output_dir)"
  )
  parser.add_argument(
    "--combine", default=None, help="comma-separated output dirs: write --doc from their tables"
  )
  parser.add_argument("--doc", default=None, help="also write this Markdown page")
  parser.add_argument("--backbones", default="resnet12,resnet18,vit_tiny")
  parser.add_argument("--settings", default="5w1s,5w5s,lake20w1s")
  parser.add_argument("--rows", default="all", help="comma-separated row numbers, or 'all'")
  parser.add_argument("--held_out", default="Latin,Tagalog", help="episode alphabets")
  parser.add_argument("--seeds", type=int, default=3, help="pretraining seeds")
  parser.add_argument("--first_seed", type=int, default=0, help="seeds first_seed, ...")
  parser.add_argument("--episodes", type=int, default=20, help="episodes per setting and seed")
  parser.add_argument("--lake_runs", type=int, default=20, help="Lake runs used (first n)")
  parser.add_argument("--queries", type=int, default=15, help="queries per class (5-way)")
  parser.add_argument("--pretrain_steps", type=int, default=1500)
  parser.add_argument("--pretrain_lr", type=float, default=2e-3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per episode")
  parser.add_argument("--num_directions", type=int, default=4, help="K (jvp, SPSA)")
  parser.add_argument("--epsilon", type=float, default=1e-2, help="SPSA epsilon, weight units")
  parser.add_argument(
    "--shift", type=int, default=2, help="support images shifted by up to this many pixels a step"
  )
  parser.add_argument(
    "--shift_padding", default="zeros", help="zeros or edge (for corrupted, non-black borders)"
  )
  parser.add_argument(
    "--learning_rates",
    default="backprop=0.01,backprop_probe=0.05,forward=0.002,sign=0.0005,sign_probe=0.005",
    help="learning rate per row kind (SGD, weight units)",
  )
  parser.add_argument("--image_size", type=int, default=28)
  parser.add_argument(
    "--compilation_cache",
    default=None,
    help="JAX persistent compilation cache folder: runs with the same episode shapes (another "
    "seed range, a corruption, a rerun) reuse the compiled episode functions instead of "
    "spending minutes compiling each row again",
  )
  parser.add_argument(
    "--corruption",
    default=None,
    help="NAME:SEVERITY (fgjax.data.corrupt) applied to the support and queries of every episode: "
    "a domain shift away from the clean pretraining characters; the setting is reported as "
    "e.g. 5w1s+impulse_noise5",
  )
  return parser.parse_args(argv)


def pretrain(backbone: str, chars, classes, seed: int, args):
  """Backprop pretraining as a classifier of `classes` (Adam, cosine decay, random shifts)."""
  keep = np.isin(chars.data.y, classes)
  remap = {int(c): i for i, c in enumerate(classes)}
  x = chars.data.x[keep]
  y = np.asarray([remap[int(c)] for c in chars.data.y[keep]], np.int32)
  model = BACKBONES[backbone](len(classes), None)
  variables = dict(model.init(jax.random.key(seed), jnp.asarray(x[:2]), train=False))
  params = variables.pop("params")
  config = {
    "optimizer": "adam",
    "optimizer_kwargs": {"learning_rate": args.pretrain_lr},
    "schedule": "cosine",
    "steps": args.pretrain_steps,
  }
  optimizer = training.make_optimizer(config, forward=False)
  state = training.TrainState.create(params, variables, optimizer, jax.random.key(seed))
  step = training.make_train_step(model, optimizer, update_batch_stats=True)
  shift = jax.jit(functools.partial(fewshot.random_shift, shift=2))
  rng = np.random.default_rng(seed)
  losses = []
  for index in range(args.pretrain_steps):
    batch = rng.integers(0, len(y), args.batch_size)
    images = shift(jnp.asarray(x[batch]), jax.random.fold_in(jax.random.key(seed + 1), index))
    state, metrics = step(state, fdata.Batch(images, jnp.asarray(y[batch])))
    if index % 100 == 0 or index == args.pretrain_steps - 1:
      losses.append(float(metrics["loss"]))
  eval_step = training.make_eval_step(model)
  train_accuracy = training.evaluate(eval_step, state.params, state.model_state, x, y)["accuracy"]
  return {"params": state.params, **state.model_state}, {
    "train_accuracy": train_accuracy,
    "final_loss": losses[-1],
  }


def cached_pretrain(backbone: str, chars, classes, seed: int, args):
  """`pretrain`, or its result saved by an earlier run with the same pretraining arguments."""
  key = f"{backbone}_seed{seed}_steps{args.pretrain_steps}_lr{args.pretrain_lr}_b{args.batch_size}"
  folder = pathlib.Path(args.pretrained_dir or pathlib.Path(args.output_dir) / "pretrained")
  path = folder / f"{key}_{args.held_out.replace(',', '-')}_{args.image_size}.msgpack"
  if path.exists():
    restored = flax.serialization.msgpack_restore(path.read_bytes())
    return jax.tree.map(jnp.asarray, restored["variables"]), restored["info"]
  variables, info = pretrain(backbone, chars, classes, seed, args)
  folder.mkdir(parents=True, exist_ok=True)
  state = {"variables": jax.device_get(variables), "info": info}
  path.write_bytes(flax.serialization.msgpack_serialize(state))
  return variables, info


def episodes_for(setting: str, chars, classes, runs, seed: int, args):
  if setting.startswith("lake"):
    episodes = [fewshot.episode_from_run(run) for run in runs[: args.lake_runs]]
  else:
    ways, shots = SETTINGS[setting]
    sampler = fewshot.EpisodeSampler(
      chars.data, classes, num_ways=ways, num_shots=shots, num_queries=args.queries, seed=seed
    )
    episodes = list(sampler.take(args.episodes))
  return [shifted(episode, seed * 1000 + index, args) for index, episode in enumerate(episodes)]


def shifted(episode, seed: int, args):
  """`episode` with `--corruption` applied to its support and queries (a fixed draw per episode)."""
  if not args.corruption:
    return episode
  name, severity = parse_corruption(args.corruption)
  return episode._replace(
    support_x=fdata.corrupt(episode.support_x, name, severity, seed=seed),
    query_x=fdata.corrupt(episode.query_x, name, severity, seed=seed + 1),
  )


def parse_corruption(text: str) -> tuple[str, int]:
  name, severity = text.split(":")
  return name, int(severity)


def setting_label(setting: str, args) -> str:
  """The setting's name in the tables: e.g. "5w1s", or "5w1s+impulse_noise5" with a corruption."""
  if not args.corruption:
    return setting
  name, severity = parse_corruption(args.corruption)
  return f"{setting}+{name}{severity}"


def run(args) -> list[dict]:
  chars = fdata.omniglot(args.data_dir, image_size=args.image_size)
  runs = fdata.omniglot_runs(args.data_dir, image_size=args.image_size)
  held_out = args.held_out.split(",")
  episode_classes = chars.classes_of(held_out)
  pretrain_classes = np.setdiff1d(np.arange(chars.data.num_classes), episode_classes)
  rates = dict(item.split("=") for item in args.learning_rates.split(","))
  rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
  output = pathlib.Path(args.output_dir)
  output.mkdir(parents=True, exist_ok=True)
  # Read by `combine` when the run is stopped before its end (no meta.json then).
  (output / "command.txt").write_text("scripts/fewshot_study.py " + " ".join(sys.argv[1:]) + "\n")
  episode_file = open(output / "episodes.csv", "w", newline="")
  episode_writer = csv.writer(episode_file)
  episode_writer.writerow(
    ["backbone", "setting", "row", "seed", "episode", "zero_shot", "accuracy", "final_loss"]
  )
  records = []
  for backbone in args.backbones.split(","):
    pretrained = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
      start = time.time()
      variables, info = cached_pretrain(backbone, chars, pretrain_classes, seed, args)
      pretrained.append(variables)
      print(
        f"{backbone} seed {seed}: pretrained on {len(pretrain_classes)} classes in "
        f"{time.time() - start:.0f}s, train accuracy {info['train_accuracy']:.3f}, "
        f"loss {info['final_loss']:.3f}",
        file=sys.stderr,
        flush=True,
      )
    for setting in args.settings.split(","):
      label = setting_label(setting, args)
      seeds = range(args.first_seed, args.first_seed + args.seeds)
      per_seed = [
        episodes_for(setting, chars, episode_classes, runs, 1000 + s, args) for s in seeds
      ]
      ways = per_seed[0][0].num_ways
      for name, method, precision, trainable, rate_key in rows:
        if trainable == "prompts" and backbone != "vit_tiny":
          continue
        config = fewshot.FinetuneConfig(
          method=method,
          precision=precision,
          trainable=trainable,
          steps=args.steps,
          learning_rate=float(rates[rate_key]) if rate_key else 0.0,
          num_directions=args.num_directions,
          epsilon=args.epsilon,
          shift=args.shift,
          shift_padding=args.shift_padding,
        )
        prompts = 2 if trainable == "prompts" else 0
        make_model = functools.partial(_make, backbone, prompts=prompts)
        start = time.time()
        # One learner per row and setting: it compiles once and serves every seed (rebind).
        learner = fewshot.EpisodeLearner(
          make_model, pretrained[0], config, ways, example_shape=per_seed[0][0].support_x.shape[1:]
        )
        for seed, variables, episodes in zip(seeds, pretrained, per_seed, strict=True):
          learner.rebind(variables)
          for index, episode in enumerate(episodes):
            result = learner(episode, seed=seed * 10_000 + index)
            episode_writer.writerow(
              [backbone, label, name, seed, index, result["zero_shot"], result["accuracy"]]
              + [result["final_loss"]]
            )
            records.append(
              {"backbone": backbone, "setting": label, "row": name, "seed": seed, **result}
            )
        episode_file.flush()
        done = [r for r in records if r["backbone"] == backbone and r["setting"] == label]
        mean = np.mean([r["accuracy"] for r in done if r["row"] == name])
        zero = np.mean([r["zero_shot"] for r in done if r["row"] == name])
        print(
          f"  {backbone} {label:9s} {name:34s} {mean:.3f} (zero-shot {zero:.3f}, "
          f"{time.time() - start:.0f}s)",
          file=sys.stderr,
          flush=True,
        )
  episode_file.close()
  return summarize(records, rows, labelled(args))


def labelled(args) -> argparse.Namespace:
  """The backbones and settings of `args` as the tables name them (see `setting_label`)."""
  settings = ",".join(setting_label(s, args) for s in args.settings.split(","))
  return argparse.Namespace(backbones=args.backbones, settings=settings)


def _make(backbone, num_classes, quant, prompts=0):
  return BACKBONES[backbone](num_classes, quant, prompts)


def summarize(records, rows, args) -> list[dict]:
  out = []
  for backbone in args.backbones.split(","):
    for setting in args.settings.split(","):
      for name, method, precision, trainable, _ in rows:
        chosen = [
          r
          for r in records
          if r["backbone"] == backbone and r["setting"] == setting and r["row"] == name
        ]
        if not chosen:
          continue
        accuracy = [r["accuracy"] for r in chosen]
        mean, ci = fewshot.mean_confidence_interval(accuracy)
        zero_mean, zero_ci = fewshot.mean_confidence_interval([r["zero_shot"] for r in chosen])
        # Paired by episode: the change that fine-tuning made, with its own (tighter) interval.
        delta, delta_ci = fewshot.mean_confidence_interval(
          [r["accuracy"] - r["zero_shot"] for r in chosen]
        )
        per_seed = [
          np.mean([r["accuracy"] for r in chosen if r["seed"] == s])
          for s in sorted({r["seed"] for r in chosen})
        ]
        out.append(
          {
            "backbone": backbone,
            "setting": setting,
            "row": name,
            "method": method,
            "precision": precision,
            "trainable": trainable,
            "accuracy": mean,
            "ci95": ci,
            "seed_std": float(np.std(per_seed)),
            "zero_shot": zero_mean,
            "zero_shot_ci95": zero_ci,
            "change": delta,
            "change_ci95": delta_ci,
            "episodes": len(chosen),
            "seeds": len(per_seed),
          }
        )
  return out


def markdown_table(summary, args) -> str:
  settings = args.settings.split(",")
  labels = {"5w1s": "5-way 1-shot", "5w5s": "5-way 5-shot", "lake20w1s": "Lake 20-way 1-shot"}
  for setting in settings:  # A domain shift, e.g. "5w1s+impulse_noise5".
    base, _, shift = setting.partition("+")
    if shift and base in labels:
      labels[setting] = f"{labels[base]}, {shift}"
  lines = []
  for backbone in args.backbones.split(","):
    lines.append(
      f"\n**{backbone}** (query accuracy %: mean ± 95 % CI over episodes x seeds [std of the "
      "per-seed means]; Δ: change from the row's zero-shot ProtoNet on the same episodes, ± 95 % "
      "CI)\n"
    )
    lines.append("| row | " + " | ".join(labels.get(s, s) for s in settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    names = [r["row"] for r in summary if r["backbone"] == backbone]
    for name in dict.fromkeys(names):
      cells = []
      for setting in settings:
        match = [
          r
          for r in summary
          if r["backbone"] == backbone and r["setting"] == setting and r["row"] == name
        ]
        if match:
          r = match[0]
          cell = f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f} [{100 * r['seed_std']:.1f}]"
          if r["method"] != "none":
            cell += f" Δ {100 * r['change']:+.1f} ± {100 * r['change_ci95']:.1f}"
          if r["precision"] != "float32":
            cell += f" (zero-shot {100 * r['zero_shot']:.1f})"
          cells.append(cell)
        else:
          cells.append("-")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def combine(folders: list[str], doc: pathlib.Path) -> str:
  """Writes `doc` from the `episodes.csv` of several runs (e.g. one per backbone or per seed).

  Episodes of the same backbone, setting and row are pooled across runs, so seeds run in
  separate processes make one row. Returns the table.
  """
  records, commands, backbones, settings, seen = [], [], [], [], set()
  for folder in folders:
    folder = pathlib.Path(folder)
    if (folder / "meta.json").exists():
      meta = json.loads((folder / "meta.json").read_text())
      commands.append(
        f"- `{meta['command']}` ({meta['machine']}; {meta['seconds'] / 60:.0f} min wall on a "
        "shared machine, not a benchmark)"
      )
    else:  # A run stopped before its end (a deadline): its complete rows only.
      command = "python " + (folder / "command.txt").read_text().strip()
      commands.append(f"- `{command}` (stopped before its end; its complete rows only)")
    with open(folder / "episodes.csv", newline="") as file:
      lines = list(csv.DictReader(file))
    counts = {}
    for line in lines:
      group = (line["backbone"], line["setting"], line["row"])
      counts[group] = counts.get(group, 0) + 1
    for line in lines:
      group = (line["backbone"], line["setting"], line["row"])
      full = max(n for g, n in counts.items() if g[:2] == group[:2])
      episode = (*group, line["seed"], line["episode"])
      if counts[group] < full or episode in seen:
        continue  # A row cut short, or an episode another run already reported (same result).
      seen.add(episode)
      record = {key: line[key] for key in ("backbone", "setting", "row")}
      record["seed"] = int(line["seed"])
      for key in ("zero_shot", "accuracy", "final_loss"):
        record[key] = float(line[key])
      records.append(record)
      backbones += [record["backbone"]] if record["backbone"] not in backbones else []
      settings += [record["setting"]] if record["setting"] not in settings else []
  pooled = argparse.Namespace(backbones=",".join(backbones), settings=",".join(settings))
  summary = summarize(records, ROWS, pooled)
  table = markdown_table(summary, pooled)
  header = doc.read_text().split("<!-- table -->")[0] if doc.exists() else "# Few-shot\n\n"
  doc.write_text(header + "<!-- table -->\nCommands:\n\n" + "\n".join(commands) + "\n" + table)
  with open(doc.with_suffix(".csv"), "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
  return table


def main(argv=None):
  args = parse_args(argv)
  if args.combine:
    combine(args.combine.split(","), pathlib.Path(args.doc or "docs/results/fewshot.md"))
    return
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  start = time.time()
  summary = run(args)
  elapsed = time.time() - start
  output = pathlib.Path(args.output_dir)
  with open(output / "results.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
  table = markdown_table(summary, labelled(args))
  (output / "table.md").write_text(table)
  meta = {
    "command": "python scripts/fewshot_study.py "
    + " ".join(sys.argv[1:] if argv is None else argv),
    "seconds": elapsed,
    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
    "args": vars(args),
  }
  (output / "meta.json").write_text(json.dumps(meta, indent=2))
  print(table)
  print(f"{elapsed:.0f}s", file=sys.stderr)
  if args.doc:
    write_doc(pathlib.Path(args.doc), args)


def write_doc(path: pathlib.Path, args) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  combine([args.output_dir], path)


if __name__ == "__main__":
  main()
