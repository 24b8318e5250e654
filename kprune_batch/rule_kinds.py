"""The names of the rule kinds and the statistics they use (no numpy: validate imports this)."""
from __future__ import annotations

STAT_KINDS = ("mean", "abs_mean", "l1", "l2")  # statistics of a filter's kernel slice
# Every filter statistic a threshold or ranking rule may use. Kernel statistics come from the
# slices alone; the others from something the selection stage looks up (bn_gamma: the layer's
# BatchNormalization follower, data statistics: the model's samples, measured by impact.py).
DATA_KINDS = ("apoz", "activation_mean")
BY_KINDS = STAT_KINDS + ("bn_gamma",) + DATA_KINDS
RANKING_KINDS = ("smallest", "largest")
RULE_KINDS = ("index",) + BY_KINDS + ("sign",) + RANKING_KINDS
