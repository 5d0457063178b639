"""Last mile on scikit-learn's 8x8 digits: pretrain upright, adapt to digits rotated by 30 degrees.

Source domain: 60 % of the 1,797 digits, upright (80 % to pretrain, 20 % to test). Target
domain: the other 40 %, rotated; 10 per class (100 images) to adapt on, the rest (619) to test.
Model: SmallCNN (conv 16, conv 32, dense 64). No network and no data folder needed.

Commands (CPU):
  python -m experiments.demo --workdir=/tmp/digits    # all three runs and the table below
or one run at a time:
  python -m experiments.main --config=experiments/configs/digits_demo.py --workdir=/tmp/digits/pre
  python -m experiments.main --config=experiments/configs/digits_demo.py \
    --workdir=/tmp/digits/spsa --config.mode=adapt --config.adapt.pretrained=/tmp/digits/pre

Runtime: 20 to 22 s wall per seed on 2 idle CPU cores (seeds 0, 1, 2, timed by
`scripts/readme_results.py --tasks=digits` on the 2026-12-02 release); most of it is start-up and
XLA compilation.

Result (seeds 0, 1, 2: `python -m experiments.demo --config.seed=<seed>`, run by
`scripts/readme_results.py --tasks=digits --seeds=0,1,2` on the release code;
docs/results/readme.md).
Accuracy on the rotated test digits, mean ± std over the seeds; memory is XLA's estimate for one
training step (temp / total KiB), beside a backprop step on the same model and precision:
  pretrain, backprop, float32:        zero-shot 47.2 ± 4.3 %, 600 steps, 600 fwd + 600 bwd
  sign-m-SPSA K=4, w16a8 int weights: adapted 79.8 ± 1.3 % (79.3, 81.3, 78.7), 800 steps,
                                      6400 fwd, 665 / 701 KiB (backprop at w16a8: 1634 / 1696 KiB)
  backprop, float32 (reference):      adapted 92.4 ± 0.6 % (91.9, 92.1, 93.1), 800 steps,
                                      800 fwd + 800 bwd, 1438 / 1500 KiB
Expect each figure within about two std of these means on another machine.
Sign-m-SPSA adapts the integer kernels and the float biases, in weight units.
"""

import ml_collections

from experiments.configs import common


def get_config():
  config = common.base_config()
  config.data.name = "digits"
  config.data.shift = "rotate"
  config.data.rotate_degrees = 30.0
  config.data.shots = 10
  common.small_model(config, "small_cnn")
  config.pretrain.steps = 600
  config.pretrain.batch_size = 64
  config.log_every = 50
  config.eval_every = 100
  config.checkpoint_every = 200
  # Fixed-point sign-m-SPSA at w16a8: integer weights; epsilon and the learning rate are in
  # weight units (since e8bfc75). 1.5e-3 and 0.012 are the former 128 and 1024 steps of the
  # 16-bit grid at its median step (1.2e-5); lr 0.004 / 0.012 / 0.03 gave 75.6 / 78.2 / 64.6 %
  # (seed 0, adapt runs of this config with --config.adapt.optimizer_kwargs.learning_rate=...).
  common.fixed_point_sign_spsa(config, epsilon=1.5e-3, learning_rate=0.012, batch_size=32)
  config.adapt.distribution = "rademacher"
  config.adapt.steps = 800
  config.adapt.schedule = "cosine"
  # The reference run of `python -m experiments.demo`: these fields replace those of `adapt`.
  config.reference = ml_collections.ConfigDict()
  config.reference.method = "backprop"
  config.reference.precision = "float32"
  config.reference.weight_storage = "float"
  config.reference.rounding = "nearest"
  config.reference.learning_rate = 0.05
  return config
