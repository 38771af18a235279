"""Exports of a finished ltc-ray output into other layouts (the seed's img_names.txt folders)."""

from ltc_ray.export.folders import cluster_folder, export_folders

__all__ = ["cluster_folder", "export_folders"]
