"""The paper's analyses of KArAt (and softmax) ViTs, for any of our checkpoints: learned functions, attention maps
and rollout, spectra, weight distributions, loss landscapes and optimizer paths (``karat-analyze``).

Host-free: torch, numpy and matplotlib (imported when a figure is drawn); detectron2 and mmseg checkpoints are
read by name mapping alone.
"""
from .attention import AttentionRecord, attention_maps, attention_rollout, record_attention
from .functions import edge_functions, kan_layers, summarise_functions
from .landscape import filter_normalised_direction, landscape_1d, landscape_2d, mean_loss
from .load import LoadedModel, load_model
from .path import pca, trajectory_plane
from .run import Settings, analyze
from .spectral import effective_rank, numerical_rank, row_entropy, simplex_distance, singular_values

__all__ = ["AttentionRecord", "LoadedModel", "Settings", "analyze", "attention_maps", "attention_rollout",
           "edge_functions", "effective_rank", "filter_normalised_direction", "kan_layers", "landscape_1d",
           "landscape_2d", "load_model", "mean_loss", "numerical_rank", "pca", "record_attention", "row_entropy",
           "simplex_distance", "singular_values", "summarise_functions", "trajectory_plane"]
