"""Last mile on spoken digits: pretrain on five FSDD speakers, adapt to the sixth from a few takes.

Free Spoken Digit Dataset (`$FGJAX_DATA_DIR/fsdd/recordings` or --config.data.folder): 1 s log-mel
spectrograms (97 frames x 40 mels, normalized by the source statistics). Source: george, jackson,
lucas, nicolas, theo (2,500 recordings; 90 % to pretrain, 10 % to test). Target: yweweler
(`--config.data.target_speaker`); 5 recordings per digit adapt the model (`--config.data.shots`),
the other 450 test it. Model: CRNN (conv 16, conv 32, GRU 64; BatchNorm frozen while adapting).

Commands:
  export FGJAX_DATA_DIR=/path/to/data   # holds fsdd/recordings/*.wav
  python -m experiments.main --config=experiments/configs/fsdd_speaker.py --workdir=/tmp/fsdd/pre
  python -m experiments.main --config=experiments/configs/fsdd_speaker.py --workdir=/tmp/fsdd/spsa \
    --config.mode=adapt --config.adapt.pretrained=/tmp/fsdd/pre

Runtime (2 CPU cores, commit 7afe999): pretraining 3 min 6 s wall, sign-m-SPSA adaptation
2 min 36 s, backprop adaptation 49 s.

Result (seed 0, target speaker yweweler, measured with the commands above). Accuracy on the
held-out recordings of the target speaker; memory is XLA's estimate for one training step
(temp / total KiB):
  pretrain, backprop, float32:  source test 99.6 %, target zero-shot 79.3 %, 1500 steps,
                                99804 / 101222 KiB (batch 32)
  sign-m-SPSA K=4, w16a8 int16 weights (GRU included), stochastic rounding:
                                zero-shot 79.3 % -> adapted 92.4 %, 400 steps, 3200 fwd,
                                41569 / 42106 KiB (backprop at w16a8: 87614 / 88304 KiB)
  backprop, float32, lr 0.05:   zero-shot 79.3 % -> adapted 92.9 %, 400 steps,
                                400 fwd + 400 bwd, 81103 / 81793 KiB
(backprop command: add --config.adapt.method=backprop --config.adapt.precision=float32
--config.adapt.weight_storage=float --config.adapt.optimizer_kwargs.learning_rate=0.01 to the
adapt command; lr 0.05 diverges for target speaker lucas.)
Over seeds 0, 1, 2 (`scripts/readme_results.py --tasks=fsdd --seeds=0,1,2 --float_spsa`, code of
5590cf7, docs/results/readme.md; mean ± std): zero-shot 82.4 ± 4.2 %, sign-m-SPSA w16a8
95.6 ± 1.1 %, sign-m-SPSA float32 95.7 ± 0.7 %, backprop (lr 0.01) 95.8 ± 0.4 %.
"""

from experiments.configs import common


def get_config():
  config = common.base_config()
  config.data.name = "fsdd"
  config.data.shift = "speaker"
  config.data.target_speaker = "yweweler"
  config.data.shots = 5
  config.data.num_samples = 8000
  config.data.num_mels = 40
  common.small_model(config, "crnn")
  config.pretrain.steps = 1500
  config.pretrain.batch_size = 32
  config.log_every = 100
  config.eval_every = 100
  config.checkpoint_every = 500
  # Fixed-point sign-m-SPSA at w16a8 (int16 kernels, also inside the GRU); epsilon and learning
  # rate in weight units (since e8bfc75): the former 64 and 256 grid steps at a step of ~1e-5,
  # as in mnist_shift.py (not re-tuned on FSDD: see docs/results/readme.md).
  common.fixed_point_sign_spsa(config, epsilon=6e-4, learning_rate=2.5e-3, batch_size=25)
  return config
