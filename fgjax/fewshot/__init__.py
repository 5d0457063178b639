"""Few-shot learning with forward gradients: episodes, the ProtoNet head, per-episode fine-tuning.

N-way K-shot episodes on classes disjoint from pretraining (`EpisodeSampler`, Lake's runs through
`episode_from_run`), the ProtoNet classifier (`prototypes`, `protonet_logits`) and its linear form
(`prototype_head`), backbone features (`embed`), and `EpisodeLearner`, which fine-tunes a
pretrained backbone on each episode's support set with backprop, jvp, SPSA or sign-m-SPSA, in float
or fixed point. The few-shot study of "Stepping Forward on the Last Mile" (Chen et al., NeurIPS
2024); `scripts/fewshot_study.py` writes its table.
"""

from fgjax.fewshot._episodes import Episode, EpisodeSampler, episode_from_run, sample_episode
from fgjax.fewshot._finetune import (
  EpisodeLearner,
  FinetuneConfig,
  mean_confidence_interval,
  random_shift,
)
from fgjax.fewshot._protonet import (
  embed,
  mean_prototype_distance,
  protonet_logits,
  prototype_head,
  prototypes,
  squared_distances,
)

__all__ = [
  "Episode",
  "EpisodeLearner",
  "EpisodeSampler",
  "FinetuneConfig",
  "embed",
  "episode_from_run",
  "mean_confidence_interval",
  "mean_prototype_distance",
  "protonet_logits",
  "prototype_head",
  "prototypes",
  "random_shift",
  "sample_episode",
  "squared_distances",
]
