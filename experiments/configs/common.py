"""Defaults shared by every config: each config starts from `base_config()` and changes fields."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field any mode reads, with defaults (override on the command line: --config.x=...)."""
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"  # pretrain | adapt
  config.seed = 0
  config.log_every = 50
  config.checkpoint_every = 200
  config.eval_batch_size = 256
  config.eval_every = 0  # Eval accuracy (source and target test) every N steps; 0: start and end.
  config.stop_after = 0  # Tests: leave at this step without saving, as if killed.
  config.nonfinite = "stop"  # stop | skip: a step whose loss or parameters become NaN/Inf.
  config.saturation_warning = 0.01  # Warn when this fraction of integer weights is at the limit.
  config.force_resume = False  # Resume a workdir whose checkpoint has another config.
  config.mesh = ""  # adapt: "directions=4" splits the K directions over 4 devices (fgjax.parallel)

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"  # digits | mnist | fsdd | synthetic
  config.data.folder = ""  # "" -> $FGJAX_DATA_DIR/<mnist or fsdd/recordings>
  config.data.shift = "rotate"  # none | rotate | noise | rotate_noise | speaker (fsdd)
  config.data.rotate_degrees = 30.0
  config.data.noise_std = 0.3
  config.data.num_source = 0  # images: examples in the source domain (0: 60 %)
  config.data.shots = 10  # adaptation examples per class in the target domain
  config.data.limit = 0  # keep only the first N examples (0: all)
  config.data.target_speaker = "yweweler"  # fsdd
  config.data.takes = 0  # fsdd: keep takes 0..takes-1 per speaker and digit (0: all 50)
  config.data.num_samples = 8000  # fsdd: samples per waveform (1 s at 8 kHz)
  config.data.num_mels = 40  # fsdd

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"
  config.model.kwargs = ml_collections.ConfigDict()

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.steps = 1000
  config.pretrain.batch_size = 64
  config.pretrain.optimizer = "adam"
  config.pretrain.optimizer_kwargs = ml_collections.ConfigDict({"learning_rate": 1e-3})
  config.pretrain.schedule = "constant"

  config.adapt = ml_collections.ConfigDict()
  config.adapt.pretrained = ""  # a pretraining workdir
  config.adapt.method = "sign_spsa"  # backprop | jvp | spsa | sign_spsa
  config.adapt.precision = "float32"  # float32 | bf16 | w16a16 | w16a8 | w8a8 | w4a8
  config.adapt.weight_storage = "float"  # float (fake quant) | integer (fixed point)
  config.adapt.rounding = "nearest"  # integer updates: nearest | stochastic | error_feedback
  config.adapt.trainable = "full"  # full | linear_probe | last_k | prompts
  config.adapt.last_k = 1
  config.adapt.num_directions = 4  # K
  # "" (constant K), "0:1,200:3" (m by step) or "plateau:1,3,8" (m grows when the loss stalls for
  # m_patience steps); the schedule's m replaces K (fgjax.num_directions_schedule / _on_plateau).
  config.adapt.m_schedule = ""
  config.adapt.m_patience = 50
  config.adapt.epsilon = 1e-3  # float weights: weight units; integer weights: quantization steps
  config.adapt.central = True
  config.adapt.distribution = "rademacher"
  config.adapt.sign_scale = 1.0
  config.adapt.chunk_size = "auto"
  config.adapt.steps = 300
  config.adapt.batch_size = 32
  config.adapt.optimizer = "sgd"
  config.adapt.optimizer_kwargs = ml_collections.ConfigDict({"learning_rate": 1e-3})
  config.adapt.schedule = "constant"  # constant | cosine | linear (decay to 0 over adapt.steps)
  config.adapt.compare_backprop_memory = True
  return config


def small_model(config, name: str) -> None:
  """The model of the three last-mile configs: conv 16, conv 32, then 64 units (dense or GRU)."""
  config.model.name = name
  config.model.kwargs.features = (16, 32)
  config.model.kwargs.hidden = 64


def fixed_point_sign_spsa(config, *, epsilon: float, learning_rate: float, batch_size: int = 32):
  """The paper's last-mile setting: sign-m-SPSA with K=4 directions on int16 weights and 8-bit
  activations (w16a8), stochastic rounding, plain SGD for 400 steps; epsilon and the learning rate
  in weight units (a 16-bit grid step, max|w| / 32767 per output channel, is ~1e-5 here)."""
  config.adapt.method = "sign_spsa"
  config.adapt.precision = "w16a8"
  config.adapt.weight_storage = "integer"
  config.adapt.rounding = "stochastic"
  config.adapt.num_directions = 4
  config.adapt.epsilon = float(epsilon)
  config.adapt.steps = 400
  config.adapt.batch_size = batch_size
  config.adapt.optimizer = "sgd"
  config.adapt.optimizer_kwargs.learning_rate = float(learning_rate)
