"""Build the MSI networks from a validated run config (the only place config keys meet constructors)."""

from __future__ import annotations

from torch import nn

from retinagen.config import LatentConfig, RunConfig
from retinagen.latent import LatentSpec
from retinagen.networks.discriminator import Discriminator
from retinagen.networks.generator import build_generator


def latent_spec(cfg: LatentConfig) -> LatentSpec:
    return LatentSpec(
        z_dim=cfg.z_dim,
        categorical=tuple(cfg.categorical),
        n_bernoulli=cfg.n_bernoulli,
        n_uniform=cfg.n_uniform,
        learned_variance=cfg.learned_variance,
    )


def num_classes(cfg: RunConfig) -> int:
    """0 for unconditional models, else the number of DR grades (or other classes)."""
    return cfg.model.num_classes if cfg.model.conditional else 0


def build_g(cfg: RunConfig) -> nn.Module:
    m = cfg.model
    return build_generator(
        style=m.style,
        latent=latent_spec(cfg.latent),
        resolution=m.resolution,
        w_dim=m.w_dim,
        mapping_layers=m.mapping_layers,
        channel_base=m.g_channel_base,
        channel_max=m.g_channel_max,
        num_classes=num_classes(cfg),
        mapping_lr_multiplier=m.mapping_lr_multiplier,
        code_input=m.code_input,
        grade_entry=m.grade_entry,
        grow_from=m.grow_from,
    )


def build_d(cfg: RunConfig) -> nn.Module:
    m = cfg.model
    return Discriminator(
        resolution=m.resolution,
        channel_base=m.d_channel_base,
        channel_max=m.d_channel_max,
        q_param_dim=latent_spec(cfg.latent).q_param_dim,
        num_classes=num_classes(cfg),
        mbstd_group=m.mbstd_group,
        aux_classifier=m.aux_classifier and m.conditional,
        grow_from=m.grow_from,
    )
